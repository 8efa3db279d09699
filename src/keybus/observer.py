"""What the engine tells an observer of handling attempts (metrics and tracing).

The engine calls ``begin`` right before an attempt (the handler and its middleware) and
``end`` right after it, in the key's lane, so the observer times and traces exactly what
a middleware outermost would — without a middleware layer's coroutines and
:class:`~keybus.Delivery` per attempt, which cost more than the counting itself on the
in-memory path. A subscription without an observer pays one ``is None`` per attempt.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from keybus.work import Work

__all__ = ["AttemptObserver"]

Token = TypeVar("Token")


class AttemptObserver(Protocol[Token]):
    def begin(self, work: Work) -> Token:
        """An attempt of ``work`` (``work.attempts``: 1-based) starts; returns what
        :meth:`end` gets back."""
        ...

    def end(self, work: Work, token: Token, error: BaseException | None) -> None:
        """That attempt ended: ``error`` None (handled) or what it raised. Must not
        raise."""
        ...
