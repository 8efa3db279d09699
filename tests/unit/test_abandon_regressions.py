"""Regressions around cancellation a handler does not take as meant: a revoke's abandon
swallowed or turned into an ordinary error, and a close's cancellation outlived."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

import keybus
from keybus.testing import LeakChecker
from tests.helpers import eventually, key_on

# Keys that land on partition 0 and 1 of a 2-partition memory topic.
# Keys on partition 0 and 1 of a 2-partition topic.
P0, P1 = key_on(0, 2), key_on(1, 2)


@contextlib.asynccontextmanager
async def abandoned(
    url: str, handler: Any, entered: asyncio.Event, **options: Any
) -> AsyncIterator[tuple[keybus.EventBus, keybus.Subscription]]:
    """Member a runs ``handler`` on b"stuck" (partition 1) until ``entered``; member b
    then joins, partition 1 moves to b and a's revoke abandons the stuck handler.
    Yields (publisher, a's subscription)."""
    async with (
        keybus.connect(url) as pub,
        keybus.connect(url, group="g") as a,
        keybus.connect(url, group="g") as b,
    ):
        await pub.ensure_topic("t", keybus.TopicConfig(partitions=2))
        sub = await a.subscribe("t", handler, revoke_timeout=0.05, **options)
        await pub.publish("t", b"stuck", key=P1)
        await asyncio.wait_for(entered.wait(), 5)
        await b.subscribe("t", lambda m: None)
        yield pub, sub


async def test_a_swallowed_abandon_does_not_strand_a_later_key(no_leaks: LeakChecker) -> None:
    """The swallowed abandon left the worker's cancel request pending; a later handler
    raising its own CancelledError (an ordinary failure) then ended the worker while it
    held that key's lane, and the key never ran again."""
    seen: list[bytes] = []
    entered = asyncio.Event()

    async def a_handler(m: keybus.Message) -> None:
        if m.value == b"stuck":
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return  # swallows the revoke's cancellation
        if m.value == b"boom":
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future  # raises CancelledError; nobody cancelled this task
        seen.append(m.value)

    async with abandoned(
        "memory://swallowed-abandon", a_handler, entered, max_concurrency=1, max_attempts=1
    ) as (pub, sub):
        await pub.publish("t", b"boom", key=P0)  # dead-lettered (max_attempts=1)
        await pub.publish("t", b"after", key=P0)
        await eventually(lambda: b"after" in seen, what="'after' handled")
        assert sub.stats.dead_lettered == 1


async def test_an_abandoned_work_is_not_retried_or_dead_lettered(no_leaks: LeakChecker) -> None:
    """A handler that turns the revoke's CancelledError into an exception was retried
    (and would have been dead-lettered) although the partition had a new owner."""
    calls: list[str] = []
    entered = asyncio.Event()

    async def a_handler(m: keybus.Message) -> None:
        calls.append("A")
        if len(calls) > 1:
            return  # a retry (the bug) succeeds at once
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as exc:
            raise RuntimeError("wrapped") from exc  # e.g. a library wrapping errors

    async with abandoned(
        "memory://converted-abandon", a_handler, entered, max_attempts=3, retry_backoff=0.0
    ) as (_, sub):
        # The abandoned work has unwound once its worker is no longer running it.
        await eventually(lambda: sub.running == 0, what="abandon settled")
        assert calls == ["A"]
        assert sub.stats.dead_lettered == 0
        assert sub.stats.retries == 0


async def test_a_handler_outliving_close_neither_retries_nor_dead_letters(
    no_leaks: LeakChecker, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that keeps running past the close's grace and then fails used to be
    retried and dead-lettered into the closed transport, forever (a worker alive after
    close, logging a failed dead letter every few ms)."""
    entered, release, unwound = asyncio.Event(), asyncio.Event(), asyncio.Event()
    caplog.set_level(logging.WARNING, logger="keybus")

    async def handler(m: keybus.Message) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # finishing up past the close
            unwound.set()
            raise RuntimeError("cleanup failed") from None

    bus = await keybus.connect("memory://outlive-close", group="g")
    sub = await bus.subscribe(
        "t", handler, max_attempts=2, retry_backoff=0.01, max_retry_backoff=0.01
    )
    await bus.publish("t", b"x", key="k")
    await asyncio.wait_for(entered.wait(), 5)
    await bus.close(timeout=0.1)
    assert sub.running == 1, "the premise: the handler outlives close()"
    release.set()
    await asyncio.wait_for(unwound.wait(), 5)
    # no_leaks waits for the worker to end; it must not retry or dead-letter on the way.
    await eventually(lambda: sub.running == 0, what="the late handler's end")
    assert sub.stats.retries == 0
    assert sub.stats.dead_lettered == 0
    assert not [r for r in caplog.records if "dead-lettering" in r.getMessage()]
