"""Randomized stress of the two intake windows (``max_in_flight``, ``max_uncommitted``) on
the memory backend: handlers that yield, fail, dead-letter or hang on a gate, while a
second member joins and leaves (partitions revoked, abandoned, re-assigned). Every
scenario is seeded, so a failure names the seed that reproduces it.

Checked after every change of a tracker: its ``size`` equals the works in its queues, is
at most ``max_uncommitted``, and ``in_flight`` is at most ``max_in_flight``. Checked all
along: intake never waits while the wake-up rule says it may go on (a lost wake-up), a
key never runs on two handlers at once, and a message never starts before every earlier
one of its key completed (handled or dead-lettered). In the end, with every gate open,
every message completed at least once and both windows are empty.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping

import pytest

import keybus
import keybus.engine
from keybus.engine import SubscriptionEngine
from keybus.partitioning import Partition
from keybus.positions import DoneTracker
from keybus.testing import LeakChecker
from keybus.work import Work

SEEDS = int(os.environ.get("KEYBUS_STRESS_SEEDS", "20"))
KEYS = [f"k{i}" for i in range(6)]


class _Flaky(Exception):
    pass


def _checked_tracker(errors: list[str]) -> type[DoneTracker]:
    class CheckedTracker(DoneTracker):
        def _check(self, what: str) -> None:
            sub = self._on_commit.__self__  # type: ignore[attr-defined]
            queued = sum(len(q) for q in self._pending.values())
            if self.size != queued:
                errors.append(f"after {what}: size {self.size}, {queued} works queued")
            if self.size > sub._uncommitted_limit:
                errors.append(f"after {what}: size {self.size} > {sub._uncommitted_limit}")
            if not 0 <= sub._in_flight <= sub._limit:
                errors.append(f"after {what}: in_flight {sub._in_flight}, limit {sub._limit}")

        def add(self, work: Work) -> None:
            super().add(work)
            self._check("add")

        def done(self, work: Work) -> None:
            super().done(work)
            self._check("done")

        def forget(self, partitions: Collection[Partition]) -> list[Work]:
            left = super().forget(partitions)
            self._check("forget")
            return left

    return CheckedTracker


class _Scenario:
    def __init__(self, seed: int, errors: list[str]) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.url = f"memory://uncommitted-stress-{seed}"
        self.errors = errors
        rng = self.rng
        self.options = {
            "max_concurrency": rng.choice((1, 2, 4)),
            "max_in_flight": rng.choice((1, 2, 3, 5, 8)),
            "max_uncommitted": rng.choice((1, 2, 3, 4, 6, 10, 16)),
            "max_attempts": rng.choice((1, 2, 3)),
            "retry_backoff": 0.0,
            "revoke_timeout": 0.01,
        }
        self.published: dict[str, int] = defaultdict(int)  # key -> messages so far
        self.plans: dict[tuple[str, int], tuple[int, int, bool]] = {}  # yields, fails, gate
        self.gates: dict[tuple[str, int], asyncio.Event] = {}
        self.failed: dict[tuple[str, int], int] = defaultdict(int)
        self.completed: dict[str, set[int]] = defaultdict(set)
        self.prefix: dict[str, int] = defaultdict(int)  # first seq of a key not completed
        self.busy: set[str] = set()
        self.subs: list[SubscriptionEngine] = []

    def complete(self, key: str, seq: int) -> None:
        done = self.completed[key]
        done.add(seq)
        while self.prefix[key] in done:
            self.prefix[key] += 1

    async def handle(self, message: keybus.Message) -> None:
        key, seq = message.key or "", int(message.value)
        if key in self.busy:
            self.errors.append(f"{key} runs twice at once")
        if seq > self.prefix[key]:
            self.errors.append(f"{key}:{seq} started before {key}:{self.prefix[key]} completed")
        yields, fails, gated = self.plans[(key, seq)]
        self.busy.add(key)
        try:
            for _ in range(yields):
                await asyncio.sleep(0)
            if gated:
                await self.gates[(key, seq)].wait()
            if self.failed[(key, seq)] < fails:
                self.failed[(key, seq)] += 1
                raise _Flaky(f"{key}:{seq}")
        finally:
            self.busy.discard(key)
        self.complete(key, seq)

    async def connect(self) -> keybus.EventBus:
        bus = await keybus.connect(self.url, group="g")
        send = bus._send_internal

        async def send_and_note(
            topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
        ) -> None:
            await send(topic, value, key, headers)
            if topic.endswith(".dlq"):  # a dead letter completes its message
                self.complete(key or "", int(value))

        bus._send_internal = send_and_note  # type: ignore[method-assign]
        return bus

    async def subscribe(self, bus: keybus.EventBus) -> keybus.Subscription:
        sub = await bus.subscribe("t", self.handle, **self.options)
        self.subs.append(sub._engine)  # white-box: the engine's windows are checked
        return sub

    async def publish(self, bus: keybus.EventBus) -> None:
        rng = self.rng
        for _ in range(rng.randint(1, 12)):
            key = rng.choice(KEYS)
            seq = self.published[key]
            self.published[key] += 1
            fails = rng.choice((0, 0, 0, 0, 1, 99))
            gated = rng.random() < 0.12
            self.plans[(key, seq)] = (rng.randint(0, 2), fails, gated)
            self.gates[(key, seq)] = asyncio.Event()
            await bus.publish("t", str(seq).encode(), key=key)

    def open_gates(self, count: int) -> None:
        shut = [k for k, g in self.gates.items() if not g.is_set()]
        for k in self.rng.sample(shut, min(count, len(shut))):
            self.gates[k].set()

    def check(self) -> None:
        for sub in self.subs:
            if sub._closing:
                continue
            in_flight, size = sub._in_flight, sub._tracker.size
            # Intake waits only while the wake-up rule holds it back (else it was lost).
            may_go = (in_flight <= sub._resume_at and size < sub._uncommitted_limit) or (
                size <= sub._uncommitted_resume and in_flight < sub._limit
            )
            if may_go and not sub._space.is_set():
                self.errors.append(f"lost wake-up: in_flight {in_flight}, size {size}")
        assert not self.errors, (self.seed, self.options, self.errors)

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if predicate():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"seed {self.seed} {self.options}: timed out on {what}")
            await asyncio.sleep(0)

    def all_completed(self) -> bool:
        return all(self.prefix[k] == n for k, n in self.published.items())

    def idle(self) -> bool:
        live = [s for s in self.subs if not s._closing]
        return all(s._in_flight == 0 and s._tracker.size == 0 for s in live)


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_intake_windows_under_random_rebalances_stay_counted_bounded_and_live(
    seed: int,
    no_leaks: LeakChecker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.CRITICAL, logger="keybus")  # failures and abandons log
    errors: list[str] = []
    monkeypatch.setattr(keybus.engine, "DoneTracker", _checked_tracker(errors))
    s = _Scenario(seed, errors)
    rng = s.rng
    async with keybus.connect(s.url) as pub:
        await pub.ensure_topic("t", keybus.TopicConfig(partitions=3))
        a = await s.connect()
        second: keybus.EventBus | None = None
        try:
            await s.subscribe(a)
            for _ in range(40):
                step = rng.random()
                if step < 0.5:
                    await s.publish(pub)
                elif step < 0.75:
                    s.open_gates(rng.randint(1, 3))
                elif second is None:
                    second = await s.connect()
                    await s.subscribe(second)  # A's partitions 1 (and 2) are revoked
                else:
                    await second.close(timeout=0.02)  # B's partitions return to A
                    second = None
                for _ in range(rng.randint(0, 4)):
                    await asyncio.sleep(0)
                    s.check()
            if second is not None and rng.random() < 0.5:
                await second.close(timeout=0.02)
                second = None

            def drained() -> bool:
                s.open_gates(len(s.gates))
                return s.all_completed() and s.idle()

            await s.until(drained, "every message completed, both windows empty", 5.0)
        finally:
            if second is not None:
                await second.close(timeout=1.0)
            await a.close(timeout=1.0)
    s.check()
