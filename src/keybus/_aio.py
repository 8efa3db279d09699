"""Task ownership helpers shared by the core and every transport.

Every task keybus starts has an owner that either awaits it or cancels it (structured
concurrency, as in anyio/trio); these are the few ways an owner does that, written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from inspect import isawaitable
from typing import Any, TypeVar

from keybus.deadline import Deadline

__all__ = [
    "being_cancelled",
    "call_hook",
    "cancel_and_wait",
    "log_failure",
    "start_feeder",
    "wait_event",
]

T = TypeVar("T")

log = logging.getLogger("keybus")


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` (all of them first) and wait until they have ended. Only their
    own cancellation is absorbed: a cancellation of the *caller* while it waits still
    propagates, where ``with suppress(CancelledError): await task`` would swallow it and
    let the caller run on (e.g. a close that was itself cancelled would keep closing) —
    and since every task was cancelled before the wait, none is left running then."""
    owned = [task for task in tasks if task is not None]
    pending = [task for task in owned if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in owned:
        if not task.cancelled() and task.exception() is not None:  # retrieved: logged once
            log.debug("keybus: %s ended with %r", task.get_name(), task.exception())


def log_failure(task: asyncio.Task[Any]) -> None:
    """A done-callback for an owned task that should not fail: say so if it did."""
    if not task.cancelled() and task.exception() is not None:
        log.error("keybus: %s failed", task.get_name(), exc_info=task.exception())


def start_feeder(body: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Start a consumer's feed loop: the task that moves records, already in memory, into
    the core's ``deliver``. It does no I/O, so only a keybus bug can end it — and then the
    subscription would stall without a word until close. Say so at once, by name. (NATS
    pull tasks, which do talk to the server, are restarted instead.)"""
    task = asyncio.get_running_loop().create_task(body, name=name)
    task.add_done_callback(_report_crash)
    return task


def _report_crash(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()  # retrieved here, so asyncio does not repeat it at collection
    if exc is not None:
        log.error(
            "keybus: %s crashed; its subscription takes no more messages until it is "
            "reopened (uncommitted ones are redelivered then)",
            task.get_name(),
            exc_info=exc,
        )


async def wait_event(event: asyncio.Event, deadline: Deadline | float) -> bool:
    """Wait for ``event`` until ``deadline`` (a :class:`Deadline`, or seconds from now);
    returns whether it is set. Not ``asyncio.wait_for``: on Python 3.11 that can swallow
    a cancellation arriving as the event fires, leaving the waiting task running."""
    if event.is_set():
        return True
    seconds = deadline.remaining() if isinstance(deadline, Deadline) else deadline
    if seconds <= 0:
        return False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


def being_cancelled() -> bool:
    """Whether the current task has a cancellation requested (someone cancelled *us*,
    as opposed to a handler raising a CancelledError of its own)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def call_hook(hook: Callable[[T], Awaitable[None] | None], event: T) -> None:
    """Call a user's callback (plain or async) with ``event``. What it raises is logged,
    not spread: a failing alert hook must not stop the loop that watches."""
    try:
        result = hook(event)
        if isawaitable(result):
            await result
    except Exception:
        log.exception("keybus: callback %r failed", hook)
