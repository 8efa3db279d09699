"""NATS ``read_topic`` (the group-less reader, ``transports/nats/reader.py``) against a
stream whose retention drops the topic's messages while the read runs: it ends as soon
as the stream has nothing more of the topic, instead of waiting for messages it counted
at the start that no longer exist.

The topic shares its stream with another subject (a Go service's configured stream) and
the stream keeps at most ``max_msgs``: what the other subject receives pushes the
topic's oldest messages out. A wrapper around the read's first fetch writes them right
then, the moment the reader counted what to read and before it got any."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats.js.errors
import pytest
import pytest_asyncio
from nats.js import JetStreamContext, api

from keybus.deadline import Deadline
from keybus.message import Message
from keybus.transports.nats.client import Stream
from keybus.transports.nats.reader import read_topic
from tests.conftest import Backend
from tests.nats.server import jetstream

READ_DEADLINE = 30.0
PROMPT = 3.0  # s: a read of a few messages on a healthy server, with room for a loaded machine


@pytest_asyncio.fixture
async def shared(backend: Backend) -> AsyncIterator[tuple[JetStreamContext, Stream, str]]:
    """A stream of at most 6 messages on the topic's subject and another one: (its
    JetStream context, the topic's ``Stream``, the other subject); deleted after."""
    name = f"KB_READER_{uuid.uuid4().hex[:8].upper()}"
    topic, other = f"reader.{name.lower()}", f"other.{name.lower()}"
    async with jetstream(backend.url) as (_, js):
        await js.add_stream(
            api.StreamConfig(
                name=name,
                subjects=[topic, other],
                max_msgs=6,
                discard=api.DiscardPolicy.OLD,
                storage=api.StorageType.MEMORY,
            )
        )
        try:
            yield js, Stream(name, (topic,)), other
        finally:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)


def before_the_first_fetch(
    monkeypatch: pytest.MonkeyPatch, js: JetStreamContext, step: Callable[[], Awaitable[None]]
) -> None:
    """Run ``step`` when the reader first fetches (it has counted what to read)."""
    subscribe = js.pull_subscribe
    done = False

    async def pull_subscribe(*args: Any, **kwargs: Any) -> JetStreamContext.PullSubscription:
        sub = await subscribe(*args, **kwargs)
        fetch = sub.fetch

        async def first_fetch(*args: Any, **kwargs: Any) -> list[Any]:
            nonlocal done
            if not done:
                done = True
                await step()
            return await fetch(*args, **kwargs)

        monkeypatch.setattr(sub, "fetch", first_fetch)
        return sub

    monkeypatch.setattr(js, "pull_subscribe", pull_subscribe)


async def read_while(
    shared: tuple[JetStreamContext, Stream, str],
    monkeypatch: pytest.MonkeyPatch,
    step: Callable[[JetStreamContext, str, str], Awaitable[None]],
) -> list[Message]:
    """Six messages on the topic (t0..t5), then a read with ``step(js, topic, other)``
    run before its first fetch; the read must end promptly."""
    js, stream, other = shared
    topic = stream.subjects[0]
    for n in range(6):
        await js.publish(topic, b"t%d" % n)
    before_the_first_fetch(monkeypatch, js, lambda: step(js, topic, other))
    began = time.monotonic()
    read = await read_topic(js, topic, stream, Deadline.after(READ_DEADLINE))
    took = time.monotonic() - began
    assert took < PROMPT, f"waited {took:.1f} s for messages retention had removed"
    assert not await js.consumers_info(stream.name), "the reader's consumer is deleted"
    return read


async def test_the_read_ends_at_once_when_retention_removed_everything_it_counted(
    shared: tuple[JetStreamContext, Stream, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def push_out(js: JetStreamContext, topic: str, other: str) -> None:
        for n in range(6):
            await js.publish(other, b"o%d" % n)

    assert await read_while(shared, monkeypatch, push_out) == []


async def test_the_read_returns_what_retention_left_and_nothing_published_after_it_began(
    shared: tuple[JetStreamContext, Stream, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def push_out_three_then_add_one(js: JetStreamContext, topic: str, other: str) -> None:
        for n in range(2):
            await js.publish(other, b"o%d" % n)
        await js.publish(topic, b"late")  # (it pushes out a third of the topic's)

    read = await read_while(shared, monkeypatch, push_out_three_then_add_one)
    assert [m.value for m in read] == [b"t3", b"t4", b"t5"]
    assert [m.offset for m in read] == [4, 5, 6], "offsets are stream sequences"
