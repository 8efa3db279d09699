"""``cancel_and_wait``: the one way keybus stops a task it owns."""

from __future__ import annotations

import asyncio
import logging

import pytest

from keybus._aio import cancel_and_wait
from keybus.testing import LeakChecker
from tests.helpers import eventually


async def test_a_cancellation_of_the_caller_is_not_swallowed(no_leaks: LeakChecker) -> None:
    """``with suppress(CancelledError): await task`` also swallows a cancel aimed at the
    caller: a close that was itself cancelled would run on as if nothing happened."""
    started, unwinding, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_to_stop() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            unwinding.set()
            await release.wait()  # takes its time to clean up
            raise

    inner = asyncio.create_task(slow_to_stop())
    await started.wait()
    outer = asyncio.create_task(cancel_and_wait(inner))
    await asyncio.wait_for(unwinding.wait(), 5)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert not inner.done(), "the caller's cancellation ended the wait, not the task"
    release.set()
    await eventually(inner.done, what="the inner task unwound")
    assert inner.cancelled()


async def test_the_task_ends_before_it_returns_and_its_failure_is_retrieved(
    no_leaks: LeakChecker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="keybus")
    started = asyncio.Event()

    async def fails_on_cancel() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(fails_on_cancel())
    await started.wait()
    await cancel_and_wait(task)  # no RuntimeError leaks into the caller
    assert task.done()
    assert not task.cancelled()
    assert "ended with RuntimeError('cleanup failed')" in caplog.text  # retrieved, said
    await cancel_and_wait(None)  # nothing to do
