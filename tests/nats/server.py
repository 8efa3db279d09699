"""The server's side of things, seen from a NATS connection of the test's own: consumers
and their floors, stream contents, records written by "another service"."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

import nats
from keybus.transports.nats.names import stream_name, subject_base


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[tuple[NatsClient, JetStreamContext]]:
    """A plain nats-py connection (closed on exit) and its JetStream context."""
    nc = await nats.connect(url)
    try:
        yield nc, nc.jetstream()
    finally:
        await nc.close()


async def consumers(url: str, topic: str) -> list[ConsumerInfo]:
    """The durable consumers of ``topic``'s stream."""
    async with jetstream(url) as (_, js):
        return list(await js.consumers_info(stream_name(topic)))


async def until_server(
    url: str, topic: str, check: Callable[[list[ConsumerInfo]], bool], what: str
) -> None:
    """Poll the server's view of the topic's consumers until ``check`` holds."""
    deadline = time.monotonic() + 20
    while not check(await consumers(url, topic)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def holding(url: str, topic: str, records: int) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``eventually``: the topic's stream holds ``records`` records."""

    async def check() -> bool:
        async with jetstream(url) as (_, js):
            info = await js.stream_info(stream_name(topic))
        return bool(info.state.messages == records)

    return check


async def write_foreign(
    url: str, topic: str, *records: tuple[bytes, dict[str, str] | None], partition: int = 0
) -> None:
    """Publish straight onto a partition's subject, as another service would: no key,
    and only the headers given."""
    async with jetstream(url) as (_, js):
        for value, headers in records:
            await js.publish(f"{subject_base(topic)}.{partition}", value, headers=headers)


def ack_floor(info: ConsumerInfo) -> int:
    return info.ack_floor.stream_seq if info.ack_floor else 0


def delivered(info: ConsumerInfo) -> int:
    return info.delivered.stream_seq if info.delivered else 0
