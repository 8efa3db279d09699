"""Randomized stress of the keyed dispatcher: lazy worker wake-up, lane reuse, drop and
abandon. Every scenario is seeded, so a failure names the seed that reproduces it.

Invariants checked all along: a key's works start in submission order and never two at
once, dropped work never starts, at most ``max_concurrency`` run; at every quiescent
point (all running handlers blocked) either every worker is busy or no lane waits; in the
end every work that was not dropped has run, and the dispatcher stops cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import defaultdict
from collections.abc import Hashable

import pytest

from keybus.dispatch import KeyedDispatcher
from keybus.message import Message
from keybus.work import QUEUED, Work
from tests.helpers import eventually

SEEDS = int(os.environ.get("KEYBUS_STRESS_SEEDS", "40"))


class _Item:
    """The test's own view of one submitted work."""

    __slots__ = (
        "abandoned",
        "blocked",
        "finished",
        "gate",
        "key",
        "plan",
        "seq",
        "started",
        "swallow",
        "work",
        "yields",
    )

    def __init__(self, seq: int, key: Hashable | None, rng: random.Random) -> None:
        self.seq = seq
        self.key = key
        self.plan = rng.choice(("sync", "yield", "gate", "gate", "raise"))
        self.yields = rng.randint(1, 3)
        self.swallow = rng.random() < 0.5  # swallows an abandon's cancellation
        self.gate = asyncio.Event()
        self.blocked = False
        self.started = False
        self.finished = False
        self.abandoned = False
        self.work = Work(Message("t", b"", None, {}, rng.randint(0, 2), seq), None, None)


class _Model:
    def __init__(self, rng: random.Random, max_concurrency: int) -> None:
        self.rng = rng
        self.max = max_concurrency
        self.items: dict[int, _Item] = {}  # by offset
        self.submitted: dict[Hashable | None, list[_Item]] = defaultdict(list)
        self.started: dict[Hashable | None, list[_Item]] = defaultdict(list)
        self.dropped: set[int] = set()
        self.inside: set[int] = set()  # works inside process() now
        self.busy_keys: set[Hashable] = set()
        self.keys: dict[int, Hashable | None] = {}
        self.seq = 0
        self.errors: list[str] = []
        self.dispatcher = KeyedDispatcher(self.process, max_concurrency, "stress")

    async def process(self, work: Work) -> None:
        item = self.items[work.message.offset]
        if item.started:
            self.errors.append(f"work {item.seq} started twice")
        if item.seq in self.dropped:
            self.errors.append(f"dropped work {item.seq} started")
        item.started = True
        key = item.key
        if key is not None:
            if key in self.busy_keys:
                self.errors.append(f"two works of key {key!r} at once")
            self.busy_keys.add(key)
        self.started[key].append(item)
        self.inside.add(item.seq)
        if len(self.inside) > self.max:
            self.errors.append(f"{len(self.inside)} running, max {self.max}")
        try:
            if item.plan == "sync":
                return
            for _ in range(item.yields):
                await asyncio.sleep(0)
            if item.plan == "gate":
                item.blocked = True
                try:
                    await item.gate.wait()
                finally:
                    item.blocked = False
            elif item.plan == "raise":
                raise RuntimeError("handler failed (expected in this test)")
        except asyncio.CancelledError:
            if not item.abandoned:
                self.errors.append(f"work {item.seq} cancelled without being abandoned")
            if not item.swallow:
                raise
        finally:
            item.finished = True
            self.inside.discard(item.seq)
            if key is not None:
                self.busy_keys.discard(key)

    # -- actions -------------------------------------------------------------------

    def submit(self) -> None:
        rng = self.rng
        key: Hashable | None = None if rng.random() < 0.15 else rng.randint(0, 11)
        self.seq += 1
        item = _Item(self.seq, key, rng)
        self.items[self.seq] = item
        self.submitted[key].append(item)
        self.dispatcher.submit(item.work, key)

    def release(self) -> None:
        blocked = [i for i in self.items.values() if i.blocked and not i.gate.is_set()]
        for item in self.rng.sample(blocked, min(len(blocked), self.rng.randint(1, 3))):
            item.gate.set()

    def drop(self) -> None:
        partition = self.rng.randint(0, 2)
        queued = {
            i.seq
            for i in self.items.values()
            if i.work.state == QUEUED and i.work.partition[1] == partition
        }
        dropped = self.dispatcher.drop(lambda w: w.partition[1] == partition)
        got = {w.message.offset for w in dropped}
        if got != queued:
            self.errors.append(f"drop returned {sorted(got)}, queued were {sorted(queued)}")
        self.dropped |= got

    def abandon(self) -> None:
        running = [i for i in self.items.values() if i.seq in self.inside and not i.abandoned]
        if running:
            item = self.rng.choice(running)
            item.abandoned = True
            KeyedDispatcher.abandon([item.work])

    # -- checks --------------------------------------------------------------------

    def outstanding(self, item: _Item) -> bool:
        return not item.finished and item.seq not in self.dropped

    def waiting_lanes(self) -> int:
        """Lanes with work that has not started yet."""
        keys: set[Hashable] = set()
        unkeyed = 0
        for item in self.items.values():
            if self.outstanding(item) and not item.started:
                if item.key is None:
                    unkeyed += 1
                else:
                    keys.add(item.key)
        return len(keys) + unkeyed

    def quiescent_and_live(self) -> bool:
        running = [self.items[s] for s in self.inside]
        if not all(i.blocked and not i.gate.is_set() for i in running):
            return False  # something can still move
        if self.dispatcher.running != len(running):
            return False
        # Lanes whose key is running count as served: their next work waits its turn.
        busy = {i.key for i in running if i.key is not None}
        waiting = 0
        seen: set[Hashable] = set()
        for item in self.items.values():
            if self.outstanding(item) and not item.started:
                if item.key is None:
                    waiting += 1
                elif item.key not in busy and item.key not in seen:
                    seen.add(item.key)
                    waiting += 1
        return len(running) == self.max or waiting == 0

    def check_structure(self) -> None:
        d = self.dispatcher
        spare_ids = [id(lane) for lane in d._spare]
        if len(set(spare_ids)) != len(spare_ids):
            self.errors.append("a lane is in the spare pool twice")
        live = {id(lane) for lane in d._lanes.values()} | {id(lane) for lane in d._ready}
        if live & set(spare_ids):
            self.errors.append("a spare lane is still in use")
        if len({id(lane) for lane in d._ready}) != len(d._ready):
            self.errors.append("a lane is in the ready queue twice")
        if len(d._workers) > self.max:
            self.errors.append(f"{len(d._workers)} workers, max {self.max}")
        if d._waking < 0:
            self.errors.append(f"_waking went negative: {d._waking}")


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_dispatcher_random_schedules_keep_order_concurrency_and_liveness(
    seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="keybus")  # the "raise" plan logs by design
    rng = random.Random(seed)
    model = _Model(rng, rng.choice((1, 2, 3, 5, 8)))
    actions = [model.submit] * 8 + [model.release] * 3 + [model.drop] + [model.abandon] + [None] * 2
    for _ in range(250):
        action = rng.choice(actions)
        if action is None:
            await eventually(
                model.quiescent_and_live, timeout=3.0, what=f"quiescence (seed {seed})"
            )
        else:
            action()
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
        model.check_structure()
        assert not model.errors, (seed, model.errors)

    # Drain: open every gate until nothing is left.
    def drained() -> bool:
        for item in model.items.values():
            if item.blocked:
                item.gate.set()
        return not any(model.outstanding(i) for i in model.items.values())

    await eventually(drained, timeout=3.0, what=f"drain (seed {seed})")
    model.check_structure()
    assert not model.errors, (seed, model.errors)
    for key, submitted in model.submitted.items():
        expected = [i.seq for i in submitted if i.seq not in model.dropped]
        got = [i.seq for i in model.started[key]]
        if key is None:
            assert sorted(got) == expected, (seed, key)
        else:
            assert got == expected, (seed, key, got, expected)
    assert model.dispatcher.running == 0
    assert model.dispatcher.peak_concurrency <= model.max
    assert await model.dispatcher.cancel(grace=1.0) == []
    assert not model.dispatcher._workers
