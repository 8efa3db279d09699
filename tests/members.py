"""Group members in processes of their own (``tests/member_proc.py``), and what their
handlers did: one :class:`Span` per handler run, with its partition, offset, fence and
``CLOCK_MONOTONIC`` start and end, comparable across processes on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keybus
from tests.conftest import Backend

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Span:
    """One handler run: which member, what (partition, offset, fence, key, version), and
    when (``time.monotonic()``; ``end`` is None while it runs, or if its process died)."""

    member: str
    partition: int
    offset: int
    fence: int
    key: str
    version: int
    start: float
    end: float | None = None


class Member:
    """A member process; its handler runs are read from its stdout as they happen."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.spans: list[Span] = []
        self._running: dict[tuple[int, int], Span] = {}
        self.ready = asyncio.Event()
        self.ticked = 0.0  # when its event loop last ran (``time.monotonic()``)
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            parts = line.decode().split()
            if parts == ["ready"]:
                self.ready.set()
            elif len(parts) == 2 and parts[0] == "tick":
                self.ticked = float(parts[1])
            elif len(parts) == 7:
                what, partition, offset, fence, key, version, moment = parts
                where = (int(partition), int(offset))
                if what == "start":
                    span = Span(self.name, *where, int(fence), key, int(version), float(moment))
                    self.spans.append(span)
                    self._running[where] = span
                elif (started := self._running.pop(where, None)) is not None:
                    started.end = float(moment)

    def stop(self) -> float:
        """SIGSTOP: the whole process freezes (as in a long GC or VM pause)."""
        self.process.send_signal(signal.SIGSTOP)
        return time.monotonic()

    def cont(self) -> float:
        self.process.send_signal(signal.SIGCONT)
        return time.monotonic()

    async def kill(self) -> float:
        killed = time.monotonic()
        self.process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 10)
        await asyncio.wait_for(self.reader, 10)
        return killed


@contextlib.asynccontextmanager
async def member_process(
    backend: Backend, topic: str, group: str, name: str, **options: Any
) -> AsyncIterator[Member]:
    """A member of ``group`` on ``topic`` in a process of its own (options: those of
    ``member_proc``), killed on exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.member_proc",
        backend.url,
        topic,
        group,
        json.dumps(options),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    member = Member(name, process)
    try:
        await asyncio.wait_for(member.ready.wait(), 30)
        yield member
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)  # a stopped process cannot die of SIGKILL
            await member.kill()
        member.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await member.reader


class Recorder:
    """The same record for a member in this process: an envelope handler taking
    ``delay`` seconds."""

    def __init__(self, name: str, delay: float) -> None:
        self.name = name
        self.delay = delay
        self.spans: list[Span] = []

    async def __call__(self, envelope: keybus.Envelope) -> None:
        delivery = keybus.current_delivery()
        span = Span(
            self.name,
            delivery.partition,
            delivery.offset,
            delivery.fence,
            envelope.aggregate_id,
            envelope.event_version,
            time.monotonic(),
        )
        self.spans.append(span)
        await asyncio.sleep(self.delay)
        span.end = time.monotonic()


def handled(spans: Iterable[Span]) -> set[tuple[str, int]]:
    """The (key, version) pairs whose handler ran to its end."""
    return {(s.key, s.version) for s in spans if s.end is not None}


def overlaps(spans: Iterable[Span], *, until: float) -> list[tuple[Span, Span]]:
    """Pairs of handler runs of one key on two different members at the same time (a run
    without an end counts as running ``until``)."""
    by_key: dict[str, list[Span]] = {}
    for span in spans:
        by_key.setdefault(span.key, []).append(span)
    found = []
    for runs in by_key.values():
        for a, b in itertools.combinations(runs, 2):
            if a.member != b.member and a.start < (b.end or until) and b.start < (a.end or until):
                found.append((a, b))
    return found
