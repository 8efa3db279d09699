"""A recognisable password and payload flow through everything a service does on a
secured Kafka - connect, publish, a failing handler, its dead letter, a failed and a
good reconnect, health, close - with keybus and librdkafka logging at DEBUG (librdkafka's
``security`` and ``conf`` debug contexts on, the ones that would print credentials); none
appears in a log record, a repr, ``bus.url`` or an exception text."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from confluent_kafka.admin import (
    AdminClient,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

import keybus
from keybus.bench.scenario import backend_url
from keybus.testing import LeakChecker
from keybus.transports.kafka import bootstrap_servers
from tests.conftest import Backend, unique
from tests.helpers import Collected, eventually
from tests.kafka.secured import SecuredKafka, secured_file, secured_kafka

PASSWORD = "kafka-password-canary-" + uuid.uuid4().hex[:8]
WRONG = "kafka-wrong-password-canary-" + uuid.uuid4().hex[:8]
PAYLOAD = "kafka-payload-canary-" + uuid.uuid4().hex[:8]
USER = "canary-" + uuid.uuid4().hex[:8]
DEBUG = {"debug": "security,conf"}  # librdkafka's own debug lines, forwarded


async def _scram_user(change: UserScramCredentialUpsertion | UserScramCredentialDeletion) -> None:
    """Create or delete a SCRAM user, over the plain listener (no authorizer there)."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers(backend_url("kafka"))})
    for future in admin.alter_user_scram_credentials([change]).values():
        await asyncio.wait_for(asyncio.wrap_future(future), 15.0)


@pytest_asyncio.fixture
async def canary_user() -> AsyncIterator[SecuredKafka]:
    """The secured listeners, with a SCRAM-SHA-512 user whose password is the canary
    (deleted again afterwards)."""
    secured = secured_kafka()
    if secured is None:
        pytest.skip(f"the test broker has no secured listeners ({secured_file()} is missing)")
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096)
    await _scram_user(UserScramCredentialUpsertion(USER, info, PASSWORD.encode()))
    yield secured
    await _scram_user(UserScramCredentialDeletion(USER, ScramMechanism.SCRAM_SHA_512))


async def test_no_password_or_payload_shows_anywhere_on_a_secured_kafka(
    no_leaks: LeakChecker,
    backend: Backend,
    canary_user: SecuredKafka,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secured = canary_user
    host = secured.sasl_ssl.split("://", 1)[1]
    url = f"kafka://{USER}:{PASSWORD}@{host}?sasl=SCRAM-SHA-512"
    options = {
        "tls": secured.tls(),
        "producer_config": DEBUG,
        "consumer_config": DEBUG,
        "admin_config": DEBUG,
    }
    topic, group = backend.topic("canary"), unique("canary-g")
    shown: list[str] = []

    async def failing(message: keybus.Message) -> None:
        raise ValueError(f"cannot handle {message.value.decode()}")

    letters = Collected()
    async with keybus.connect(url, group=group, **options) as bus:
        shown += [bus.url, repr(bus)]
        sub = await bus.subscribe(topic, failing, max_attempts=2, retry_backoff=0.01)
        await bus.subscribe(f"{topic}.dlq", letters)
        await bus.publish(topic, PAYLOAD.encode(), key="k")
        await eventually(lambda: len(letters) == 1, timeout=20.0, what="the dead letter")
        shown += [repr(sub), repr(await bus.health())]

    # A reconnect with the wrong password fails, naming the masked URL...
    wrong = url.replace(PASSWORD, WRONG)
    with pytest.raises(keybus.ConnectError, match="authentication failed") as info:
        await keybus.connect(wrong, connect_timeout=5.0, **options)
    shown += [str(info.value), repr(info.value), info.value.url]
    # ... and with the right one it works again.
    got = Collected()
    async with keybus.connect(url, group=unique("canary-again"), **options) as bus:
        await bus.subscribe(topic, got)
        await eventually(lambda: len(got) == 1, timeout=20.0, what="the message again")
        shown += [bus.url, repr(bus)]

    assert letters.values() == [PAYLOAD.encode()]  # the payload did flow
    assert any("kafka.librdkafka" in r.name for r in caplog.records)  # and was logged about
    records = [f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records]
    for canary in (PASSWORD, WRONG, PAYLOAD):
        leaks = [text[:300] for text in [*shown, *records] if canary in text]
        assert not leaks, f"{canary} shows in {leaks}"
