"""Fault injection on a real broker: three member processes of one group handle envelopes
(0-20 ms each) while a producer publishes 20,000 over 500 aggregates, and a seeded
controller SIGKILLs members (starting replacements), SIGSTOPs them for longer than the
session/lease, freezes the broker itself (SIGSTOP) for longer than that once, and restarts
the broker once. Every handler run is logged; the history checker
(``tests/faults/history.py``) then judges the whole history.

``KEYBUS_CHAOS_SECONDS`` (default 60) sets how long the faults go on;
``KEYBUS_CHAOS_SEED`` replays a controller schedule (the seed is printed)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import keybus
from keybus.testing import LeakChecker
from tests.conftest import Backend, backend_fixture, enabled_backends, unique
from tests.faults.chaos import (
    OWNERSHIP_TIMEOUT,
    Chaos,
    Member,
    Produced,
    ensure_broker,
    freeze_broker,
    produce,
    restart_broker,
)
from tests.faults.history import Envelope, History, Run, check
from tests.helpers import eventually

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("KEYBUS_CHAOS_SECONDS", "60"))
AGGREGATES = 500
VERSIONS = 40  # 20,000 envelopes
PARTITIONS = 6
MEMBERS = 3


@pytest_asyncio.fixture(params=["kafka", "nats"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param not in enabled_backends():
        pytest.skip(f"{request.param} is not in KEYBUS_BACKENDS")
    async for value in backend_fixture(request.param):
        yield value


def stalls(runs: list[Run], since: float) -> str:
    """Per partition, the longest time between two handler starts (and when it began):
    how long a fault kept a partition from being worked on."""
    starts: dict[int, list[float]] = {}
    for run in runs:
        starts.setdefault(run.partition, []).append(run.start)
    longest = {}
    for partition, moments in sorted(starts.items()):
        moments.sort()
        gap, at = max((b - a, a) for a, b in itertools.pairwise(moments))
        longest[partition] = f"{gap:.1f} from {at - since:.1f}"
    return ", ".join(f"p{p} {text}" for p, text in longest.items())


async def test_members_killed_frozen_and_a_broker_restart_keep_every_promise(
    no_leaks: LeakChecker, backend: Backend, tmp_path: Path
) -> None:
    seed = int(os.environ.get("KEYBUS_CHAOS_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    topic, group = backend.topic("chaos"), unique("chaos-g")
    incarnations = iter(range(1, 1000))

    async def spawn() -> Member:
        name = f"m{next(incarnations)}"
        return await Member.start(backend.url, topic, group, name, tmp_path, rng.randrange(1 << 32))

    chaos = Chaos(
        rng,
        spawn,
        lambda: restart_broker(backend.name, backend.url),
        OWNERSHIP_TIMEOUT[backend.name],
        lambda seconds: freeze_broker(backend.name, backend.url, seconds),
    )
    produced = Produced()
    handled: set[Envelope] = set()

    def all_acknowledged_handled() -> bool:
        for member in chaos.members:
            member.log.poll(handled)
        return produced.acknowledged <= handled

    async with keybus.connect(backend.url) as publisher:
        await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=PARTITIONS))
        try:
            chaos.members += [await spawn() for _ in range(MEMBERS)]
            await asyncio.gather(*(m.ready() for m in chaos.members))
            began = time.monotonic()
            aggregates = [f"agg-{i}" for i in range(AGGREGATES)]
            producer = asyncio.create_task(
                produce(publisher, topic, aggregates, VERSIONS, SECONDS, produced)
            )
            try:
                await chaos.run(SECONDS)
            finally:
                await chaos.settle()
            await asyncio.wait_for(producer, 180)
            faults_over = time.monotonic()
            # A drain that times out is reported by the checker below (check a), with the
            # envelopes still missing.
            with contextlib.suppress(AssertionError):
                await eventually(all_acknowledged_handled, timeout=180, what="the drain")
            drained = time.monotonic()
        finally:
            closed = await asyncio.gather(*(m.terminate() for m in chaos.members if m.alive))
            await ensure_broker(backend.name, backend.url)  # for the tests after this one

    history = History()
    for member in chaos.members:
        member.log.poll(handled)
        history.extend(member.log.history())
    runs = history.runs
    report = check(
        produced.acknowledged,
        runs,
        history.lapses,
        assigns=history.assigns,
        pauses=[pause for member in chaos.members for pause in member.pauses],
        ownership_timeout=OWNERSHIP_TIMEOUT[backend.name],
        ended_by={m.name: m.killed_at for m in chaos.members if m.killed_at is not None},
    )
    print(
        f"\nchaos on {backend.name}: seed {seed}, {SECONDS:g} s of faults, "
        f"{len(chaos.kills)} kills, {len(chaos.pauses)} pauses "
        f"({', '.join(f'{name} {s:.1f} s' for name, s in chaos.pauses)}), "
        f"{chaos.restarts} broker restart, broker frozen "
        f"{', '.join(f'{s:.1f} s' for s in chaos.broker_pauses) or 'never'}, "
        f"{produced.failures} publish errors retried; "
        f"producer done {faults_over - began:.1f} s, drained {drained - faults_over:.1f} s "
        f"after it\ntimeline (s): {chaos.timeline(began)}\n"
        f"longest stretch without a start, per partition (s): {stalls(runs, began)}\n"
        f"{report.summary()}"
    )
    assert report.acknowledged == AGGREGATES * VERSIONS
    assert chaos.kills, "the controller killed no member"
    assert chaos.pauses, "the controller froze no member"
    assert chaos.restarts == 1, "the broker was not restarted"
    assert chaos.broker_pauses, "the broker was not frozen"
    assert report.violations() == {}, f"seed {seed}:\n{report.summary()}"
    assert all(closed), "a member did not close cleanly on SIGTERM"
