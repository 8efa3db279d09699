"""Resources of one run: before it opened anything, at their peak while it ran, and after
every ``close()`` returned — compared by identity and polled to a deadline
(:class:`keybus.testing.LeakChecker`), which is what the Go SDK's "4446 leaked
goroutines" (counted before its deferred Close ran) got wrong."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from keybus.testing.leaks import LeakChecker, LeakError

__all__ = ["KINDS", "Probe", "rss_mb"]

KINDS = ("tasks", "threads", "native_threads", "fds")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """This process's resident set size in MiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


class Probe:
    """``start()`` before a run opens anything, ``await stop()`` once everything it
    opened is closed; meanwhile a sampler folds counts and RSS into the peak every
    ``interval`` s and calls ``on_tick`` (the live progress display)."""

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        interval: float = 0.1,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self._checker = LeakChecker(timeout=timeout)
        self._interval = interval
        self._on_tick = on_tick
        self._stop = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None
        self.before: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.after: dict[str, int] = {}
        self.leftovers: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.leftover_report = ""
        self.rss_mb = {"before": 0.0, "peak": 0.0, "after": 0.0}

    def start(self) -> None:
        self.before = self._checker.start().counts()
        self.rss_mb["before"] = self.rss_mb["peak"] = rss_mb()
        self._sampler = asyncio.create_task(self._sample(), name="keybus-bench-sampler")

    def _tick(self) -> None:
        self._checker.sample()
        self.rss_mb["peak"] = max(self.rss_mb["peak"], rss_mb())
        if self._on_tick is not None:
            self._on_tick()

    async def _sample(self) -> None:
        while not self._stop.is_set():
            self._tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)

    async def stop(self) -> None:
        """Stop sampling, then poll until the run's leftovers are gone or the deadline."""
        self._stop.set()
        if self._sampler is not None:
            await self._sampler
        self._tick()
        self.peak = dict(self._checker.peak)
        try:
            self.after = (await self._checker.check()).counts()
        except LeakError as exc:
            self.leftover_report = str(exc)
            after = self._checker.after
            if after is not None:
                self.after = after.counts()
                self.leftovers = after.minus(self._checker.before).counts()
        self.rss_mb["after"] = rss_mb()

    @property
    def clean(self) -> bool:
        return not self.leftover_report
