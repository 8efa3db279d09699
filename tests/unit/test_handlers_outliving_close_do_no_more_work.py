"""A handler that ignores the close's cancellation and runs on past ``close()``: it
takes no more work, and its late failure is neither retried nor dead-lettered (its
message stays uncommitted, redelivered later)."""

from __future__ import annotations

import asyncio
import logging

import pytest

import keybus
from keybus.testing import LeakChecker
from tests.helpers import eventually


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
    assert sub.stats().retries == 0
    assert sub.stats().dead_lettered == 0
    assert not [r for r in caplog.records if "dead-lettering" in r.getMessage()]


async def test_a_handler_ignoring_cancellation_takes_no_more_work_after_close(
    no_leaks: LeakChecker,
) -> None:
    after_close: list[bytes] = []
    closing = False
    entered, release, unwound = asyncio.Event(), asyncio.Event(), asyncio.Event()
    bus = await keybus.connect("memory://swallow", group="g")

    async def handler(m: keybus.Message) -> None:
        if closing:
            after_close.append(m.value)
        if m.value == b"slow":
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await release.wait()  # "finishing up", ignoring the cancel, past close()
                unwound.set()

    await bus.subscribe("t", handler, max_concurrency=1)
    await bus.publish("t", b"slow", key="k0")
    for i in range(5):
        await bus.publish("t", b"queued-%d" % i, key=f"k{i + 1}")
    await asyncio.wait_for(entered.wait(), 10)
    closing = True
    await bus.close(timeout=0.1)
    # The premise: the handler outlives close() (its worker still runs).
    assert [t for t in asyncio.all_tasks() if "worker" in t.get_name()]
    release.set()
    await asyncio.wait_for(unwound.wait(), 5)
    # The stubborn worker ends now; it must not have picked up more on the way.
    await eventually(lambda: not [t for t in asyncio.all_tasks() if "worker" in t.get_name()])
    assert after_close == []
