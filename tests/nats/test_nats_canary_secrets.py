"""A canary password, token and payload go through a whole life at DEBUG — connect,
publish, a failing handler, a dead letter, a cut connection and its reconnect, close, a
refused call and a failed connect — on the secured servers: none of them shows in the
captured logs, the reprs or the error texts (only the masked URL does)."""

from __future__ import annotations

import logging
import uuid

import pytest

import keybus
from keybus.testing import LeakChecker
from keybus.testing.conformance import unique
from keybus.testing.conformance.helpers import unused_port
from tests.helpers import eventually
from tests.nats.proxy import NatsProxy
from tests.nats.secured import require_secured, with_userinfo


async def a_life(
    proxy: NatsProxy, userinfo: str, payload: str, caplog: pytest.LogCaptureFixture
) -> list[str]:
    """What a bus connected through ``proxy`` (credentials in the URL) shows through a
    dead letter, a cut connection and its reconnect, another dead letter, and close."""
    dead: list[bytes] = []

    async def failing(message: keybus.Message) -> None:
        raise ValueError(f"cannot handle {message.value.decode()}")  # quotes the payload

    async def dead_letters(message: keybus.Message) -> None:
        dead.append(message.value)

    topic = unique("canary")
    bus = await keybus.connect(with_userinfo(proxy.url, userinfo), group="canary")
    try:
        sub = await bus.subscribe(topic, failing, max_attempts=2, retry_backoff=0.01)
        await bus.subscribe(f"{topic}.dlq", dead_letters)
        await bus.publish(topic, payload.encode(), key="k")
        await eventually(lambda: len(dead) == 1, what="the first dead letter")
        proxy.cut()
        await eventually(lambda: "reconnected to" in caplog.text, what="the reconnect")
        await bus.publish(topic, payload.encode(), key="k")
        await eventually(lambda: len(dead) == 2, what="a dead letter after the reconnect")
        # (Not sub.stats(): its ``errors`` are the handler's own exception texts, which
        # quote the payload here on purpose.)
        shown = [repr(bus), bus.url, repr(sub), repr(await bus.health())]
    finally:
        for name in (topic, f"{topic}.dlq", f"{topic}.dlq.dlq"):
            await bus.delete_topic(name)
        await bus.close(timeout=2.0)
    with pytest.raises(keybus.BusClosedError) as refused:
        await bus.publish(topic, b"late")
    return [*shown, str(refused.value)]


@pytest.mark.parametrize("kind", ["password", "token"])
async def test_no_secret_or_payload_shows_through_a_whole_life_at_debug(
    kind: str, no_leaks: LeakChecker, caplog: pytest.LogCaptureFixture
) -> None:
    servers = require_secured()
    caplog.set_level(logging.DEBUG)
    if kind == "password":
        server, secret = servers["auth"], servers["auth"]["password"]
        userinfo = f"svc:{secret}"
    else:
        server, secret = servers["token"], servers["token"]["token"]
        userinfo = secret
    assert "kb-canary" in secret  # recognisable (tools/nats/secured.sh)
    payload = f"kb-canary-payload-{uuid.uuid4().hex}"
    async with NatsProxy(server["url"]) as proxy:
        shown = await a_life(proxy, userinfo, payload, caplog)
    with pytest.raises(keybus.ConnectError) as failed:
        await keybus.connect(
            with_userinfo(f"nats://127.0.0.1:{unused_port()}", userinfo), connect_timeout=2.0
        )
    shown += [str(failed.value), repr(failed.value)]
    # The life was logged (the cut, the dead letters), with the URL masked.
    assert "disconnected from nats://" in caplog.text
    assert "**********@127.0.0.1" in caplog.text
    for canary in (secret, payload):
        assert not [text for text in [caplog.text, *shown] if canary in text]
