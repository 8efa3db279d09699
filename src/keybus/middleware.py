"""The handler middleware hook: code that runs around each handling attempt.

A middleware is an async callable ``middleware(call_next, delivery)`` that calls
``await call_next(delivery)`` to run the rest of the chain (the next middleware, and
finally the handler) and may do work before and after it::

    async def timing(call_next: keybus.CallNext, delivery: keybus.Delivery) -> None:
        started = time.perf_counter()
        try:
            await call_next(delivery)
        finally:
            observe(time.perf_counter() - started)

It runs inside the key's lane, once per attempt (a retried message passes through it
again with ``delivery.attempt`` one higher), so order holds around it. What it raises
counts as the handler's failure (retried, then dead-lettered); an exception it swallows
counts as success. Retries, dead letters and commits stay in the core: a middleware
observes and decorates an attempt, it cannot skip the commit of a message it did not
handle. Bus-wide middleware (``connect(..., middleware=[...])``) wraps the
subscription's own (``subscribe(..., middleware=[...])``), the first of each list
outermost. Metrics and tracing are written this way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from inspect import isawaitable
from typing import Any

from keybus.delivery import Delivery

__all__ = ["CallNext", "Delivery", "Middleware", "chain"]


CallNext = Callable[[Delivery], Awaitable[None]]
"""The rest of the chain: the next middleware, and finally the handler."""

Middleware = Callable[[CallNext, Delivery], Awaitable[None]]
"""``async def middleware(call_next, delivery) -> None``."""


def check_middleware(middleware: object) -> tuple[Middleware, ...]:
    """A list of middleware as given to ``subscribe``/``connect``, checked."""
    if middleware is None:
        return ()
    if (
        callable(middleware)
        or isinstance(middleware, str | bytes)
        or not isinstance(middleware, Sequence)
    ):
        raise TypeError("middleware must be a list of callables")
    for item in middleware:
        if not callable(item):
            raise TypeError(f"middleware must be callables, got {type(item).__name__}")
    return tuple(middleware)


def chain(
    handler: Callable[[Any], Awaitable[None] | None], middleware: Sequence[Middleware]
) -> CallNext:
    """``handler`` wrapped in ``middleware``, the first outermost: one callable that
    runs a whole attempt for a :class:`Delivery`. Built once per subscription."""

    async def call_handler(delivery: Delivery) -> None:
        result = handler(delivery.payload)
        if isawaitable(result):
            await result

    call: CallNext = call_handler
    for outer in reversed(middleware):
        # A partial, not a wrapping coroutine function: calling it returns the
        # middleware's own coroutine, one coroutine less per middleware and attempt.
        call = partial(outer, call)
    return call
