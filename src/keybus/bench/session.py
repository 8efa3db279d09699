"""A whole bench: which sides run (backends whose broker answers, their raw baselines),
then every level x repeat x side, alternating the order of the sides from one repeat to
the next so no side always runs first (on a colder process or broker)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from keybus.bench.environment import BrokerProcess
from keybus.bench.levels import Level
from keybus.bench.results import Row
from keybus.bench.run import Body, backend_url, broker_answers, keybus_side, measure
from keybus.bench.stats import Tracker

__all__ = ["BACKENDS", "WARMUP", "Side", "choose_sides", "run_all", "timeout_for"]

BACKENDS = ("memory", "kafka", "nats")
WARMUP = Level("warm-up", 200, 20, topics=2, partitions=1)
"""Run once per side before the measured runs, not recorded: a process's first bus on a
backend pays for imports, first connections and the broker's first streams."""


def timeout_for(level: Level) -> float:
    """A run's default bound: 60 s plus 2 s per 1,000 messages."""
    return 60.0 + level.messages / 500


@dataclass
class Side:
    backend: str
    client: str  # "keybus" or "raw"
    url: str
    body: Body
    broker: BrokerProcess | None = None

    @property
    def fresh_url(self) -> str:
        """Memory gets a fresh private broker per run; brokers keep their URL."""
        return backend_url("memory") if self.backend == "memory" else self.url


async def choose_sides(
    backends: Sequence[str], raw: bool, say: Callable[[str], None]
) -> list[Side]:
    """The sides to run; ``say`` gets a line for each backend skipped, and why."""
    sides: list[Side] = []
    for backend in backends:
        url = backend_url(backend)
        if backend != "memory":
            reason = await broker_answers(url)
            if reason is not None:
                say(f"{backend}: skipped — no broker answered at {url} ({reason})")
                continue
        broker = BrokerProcess.listening_on(url) if backend != "memory" else None
        sides.append(Side(backend, "keybus", url, keybus_side, broker))
        if raw and backend == "memory":
            say("memory: no raw baseline (its broker is keybus's own, in this process)")
        elif raw:
            from keybus.bench.raw import RAW_CLIENTS

            sides.append(Side(backend, "raw", url, RAW_CLIENTS[backend][1], broker))
    if not sides:
        say("no broker answered: running on memory (the embedded default)")
        sides.append(Side("memory", "keybus", backend_url("memory"), keybus_side))
    return sides


Progress = Callable[[Side, Level, int, Tracker], None]


async def run_all(
    levels: Sequence[Level],
    sides: Sequence[Side],
    *,
    repeat: int = 1,
    timeout: float | None = None,
    warmup: bool = True,
    progress: Progress | None = None,
    finished: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Every level x repeat x side; ``progress`` is called while a run streams and
    ``finished`` with each row (repeat 0: the warm-up, not returned)."""

    async def one(side: Side, level: Level, number: int) -> Row:
        def tick(tracker: Tracker) -> None:
            if progress is not None:
                progress(side, level, number, tracker)

        return await measure(
            level,
            side.backend,
            side.client,
            number,
            side.fresh_url,
            side.body,
            timeout=timeout or timeout_for(level),
            broker=side.broker,
            progress=tick,
        )

    if warmup:
        for side in sides:
            row = await one(side, WARMUP, 0)
            if finished is not None:
                finished(row)
    rows: list[Row] = []
    for level in levels:
        for r in range(repeat):
            shift = r % len(sides)
            for side in [*sides[shift:], *sides[:shift]]:
                row = await one(side, level, r + 1)
                rows.append(row)
                if finished is not None:
                    finished(row)
    return rows
