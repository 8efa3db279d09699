"""The leak checker: what a bus leaves behind after ``close()`` has returned.

The Go SDK's "4446 leaked goroutines" came from counting before the deferred Close ran.
So this compares *identities* (which task, which thread, which fd) taken before and after,
and on exit polls until a deadline for the difference to vanish (threads and sockets can
take a moment to be reaped), instead of sleeping a guessed time or comparing counts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["LeakChecker", "LeakError", "Resources", "keybus_objects", "snapshot"]


class LeakError(AssertionError):
    """Resources outlived the code under check; the message lists each one."""


def _native_threads() -> dict[tuple[int, int], str]:
    """Native threads by (tid, start time): tids are reused as soon as a thread exits,
    so the start time is what tells a new thread from an old one with the same tid."""
    threads: dict[tuple[int, int], str] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:  # not Linux: native threads cannot be seen
        return threads
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited while we looked
        # "tid (comm) state ppid ... starttime(22nd field)"; comm may contain spaces.
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        threads[(int(tid), int(fields[19]))] = name
    return threads


def _fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return fds
    for name in names:
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the fd listdir itself used, now closed
    return fds


@dataclass
class Resources:
    """A snapshot of what the process holds, by identity."""

    tasks: dict[int, asyncio.Task[object]] = field(default_factory=dict)
    threads: dict[int, threading.Thread] = field(default_factory=dict)
    native_threads: dict[tuple[int, int], str] = field(default_factory=dict)
    fds: dict[int, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {
            "tasks": len(self.tasks),
            "threads": len(self.threads),
            "native_threads": len(self.native_threads),
            "fds": len(self.fds),
        }

    def minus(self, before: Resources) -> Resources:
        """What this snapshot holds that ``before`` did not (fds: same number, new target
        counts as new)."""
        return Resources(
            tasks={k: v for k, v in self.tasks.items() if k not in before.tasks},
            # Thread idents are reused at once: compare the Thread objects themselves.
            threads={k: v for k, v in self.threads.items() if before.threads.get(k) is not v},
            native_threads={
                k: v for k, v in self.native_threads.items() if k not in before.native_threads
            },
            fds={k: v for k, v in self.fds.items() if before.fds.get(k) != v},
        )

    def __bool__(self) -> bool:
        return bool(self.tasks or self.threads or self.native_threads or self.fds)

    def report(self) -> str:
        lines: list[str] = []
        for task in self.tasks.values():
            lines.append(f"task {task.get_name()!r}: {task.get_coro()!r}")
            for frame in task.get_stack(limit=8):
                code = frame.f_code
                lines.append(f"    at {code.co_filename}:{frame.f_lineno} in {code.co_name}")
        for thread in self.threads.values():
            lines.append(f"thread {thread.name!r} (ident {thread.ident}, daemon={thread.daemon})")
        for (tid, _), name in self.native_threads.items():
            lines.append(f"native thread {tid} {name!r}")
        for fd, target in self.fds.items():
            lines.append(f"fd {fd} -> {target}")
        return "\n".join(lines)


def _idle_loop_workers() -> set[threading.Thread]:
    """The running loop's default-executor workers (``asyncio.to_thread``,
    ``run_in_executor(None, ...)``) when every one of them is idle: the loop owns them and
    joins them only when it closes. While any of them still runs a call, none is left out."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return set()
    executor = getattr(loop, "_default_executor", None)
    if not isinstance(executor, concurrent.futures.ThreadPoolExecutor):
        return set()
    workers = set(executor._threads)
    if executor._work_queue.qsize() or executor._idle_semaphore._value < len(workers):
        return set()
    return workers


def snapshot(*, exclude_task: asyncio.Task[object] | None = None) -> Resources:
    """Take a snapshot now (tasks only when called inside a running loop)."""
    try:
        tasks = {id(t): t for t in asyncio.all_tasks() if t is not exclude_task and not t.done()}
    except RuntimeError:
        tasks = {}
    native = _native_threads()
    live_tids = {tid for tid, _ in native}
    idle = _idle_loop_workers()
    idle_tids = {t.native_id for t in idle}

    def alive(thread: threading.Thread) -> bool:
        # A foreign thread that touched ``threading`` stays listed as a _DummyThread after
        # it ended (is_alive() is always True): believe /proc/self/task instead.
        if isinstance(thread, threading._DummyThread) and native:
            return thread.native_id in live_tids
        return thread.is_alive()

    return Resources(
        tasks=tasks,
        threads={t.ident or 0: t for t in threading.enumerate() if t not in idle and alive(t)},
        native_threads={k: v for k, v in native.items() if k[0] not in idle_tids},
        fds=_fds(),
    )


class LeakChecker:
    """``async with LeakChecker(): ...`` fails with :class:`LeakError` if, ``timeout``
    seconds after the block ends, the process still holds tasks, threads, native threads
    or fds that it did not hold when the block began.

    Also usable step by step: ``start()``, then ``await check()``; ``peak`` records the
    largest counts seen by :meth:`sample` in between."""

    def __init__(self, timeout: float = 10.0, *, check_fds: bool = True) -> None:
        self.timeout = timeout
        self.check_fds = check_fds
        self.before = Resources()
        self.after: Resources | None = None
        self.peak: dict[str, int] = {}

    def start(self) -> Resources:
        self.before = snapshot(exclude_task=_current_task())
        self.peak = self.before.counts()
        return self.before

    def sample(self) -> Resources:
        """Take a snapshot now and fold it into ``peak``."""
        now = snapshot(exclude_task=_current_task())
        for name, value in now.counts().items():
            self.peak[name] = max(self.peak.get(name, 0), value)
        return now

    def leftovers(self) -> Resources:
        now = snapshot(exclude_task=_current_task())
        self.after = now
        left = now.minus(self.before)
        if not self.check_fds:
            left.fds = {}
        return left

    async def check(self) -> Resources:
        """Poll until nothing new is held or the deadline passes; raise LeakError then."""
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            left = self.leftovers()
            if not left:
                return self.after or Resources()
            if time.monotonic() >= deadline:
                raise LeakError(
                    f"resources still held {self.timeout:g} s after close:\n{left.report()}"
                )
            gc.collect()  # sockets and fds owned by unreachable objects are closed now
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def __aenter__(self) -> LeakChecker:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.check()


def keybus_objects() -> dict[int, object]:
    """Every live object (after a collection) whose class keybus's library code defines
    (``keybus.*``; not ``keybus.testing``, whose helpers a test holds on purpose), by id.

    What a closed bus must not leave behind: compare with a call made before it opened.
    The caller holds the objects returned, so their ids cannot be reused meanwhile."""
    gc.collect()
    return {
        id(obj): obj
        for obj in gc.get_objects()
        # (__module__ is not always a str: some extension types expose a descriptor)
        if isinstance(module := type(obj).__module__, str)
        and module.startswith("keybus.")
        and not module.startswith("keybus.testing")
    }


def _current_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None
