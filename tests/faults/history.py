"""The history checker of the fault-injection test: what the producer got acknowledged,
what every handler run did and when, and which ownerships lapsed — judged against what
keybus promises. Pure: no I/O, no clock; the member processes' log lines are parsed by
:func:`parse_member_log`.

Times are ``time.monotonic()`` (``CLOCK_MONOTONIC``), one clock for every process on the
machine, so moments logged by different members compare.

The checks, and why each is a promise of keybus's:

a. **Every acknowledged envelope handled at least once** (API.md: nothing acknowledged
   is dropped): a run of its (aggregate, version) ended without error.
b. **No forward skip** (per-aggregate order, at-least-once): in the order of handler
   *starts* across all members, version ``v`` starts only after ``1..v-1`` each started
   at least once. Starting an older version again (a redelivery) is allowed.
c. **No start after an ownership ended** (README: "a member never starts a message of a
   partition whose lease it could not renew in time"). A frozen member cannot log the
   moment its lease runs out, so this is judged from what can be observed:
   - *superseded fence*: once any run on a partition started with fence ``f``, no run on
     that partition starts with a fence below ``f`` (fences grow with every change of
     owner, so a lower one is an ownership that already ended);
   - *after a lapse*: once a member logged that its ownership of a partition lapsed (or
     its lease of the topic's partitions was not renewed), it starts no run there until
     its core is assigned the partition again (a re-take: NATS claims it anew, Kafka
     proves it is still in the group's generation — so the fence may stay the same);
   - *after a pause past its ownership*: a member frozen (SIGSTOP) for longer than its
     session/lease lost every partition ``ownership_timeout`` after it froze at the
     latest; from then on, the same: no run of a partition its core was not assigned
     again since. The controller knows when it froze the member; the member logs when
     its core is assigned partitions. Neither of these two needs a fence.
d. **Overlaps carry ordered fences** (README: what self-fencing cannot stop — a handler
   already running when its process froze, finishing after the next owner began — is
   what ``Message.fence`` is for; docs/nats.md "Exclusivity: ... where it ends"). So
   "no aggregate is processed by two members at once" holds except for such a run, and
   then the run that started first carries the strictly lower fence: where runs of one
   aggregate on two members overlap in time, ``first.fence < second.fence``. Equal
   fences would be two members acting on one claim.

A run's start is logged by the handler, a few microseconds after the core checked the
partition's ownership: a SIGSTOP landing exactly between the two would make a start look
later than it was (a false finding of check c, as rare as that window is short).

Fence 0 means "unknown" (a transport that does not stamp fences): the fence checks of (c)
and (d) cannot judge such runs; they are counted apart (``unfenced_*``) and the summary
says so. The lapse and pause checks of (c) judge them all the same.
Duplicates (an envelope handled to its end more than once) are counted, not failures.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Envelope = tuple[str, int]  # (aggregate, version)

OK = "ok"
STARTED_AFTER_PAUSE = "c: started after a pause past its ownership, not assigned again"


@dataclass(frozen=True)
class Run:
    """One handler run. ``member`` names one process (an incarnation: a replacement is
    another member); ``end`` is None when no end was logged (the process was killed
    while it ran); ``outcome`` is ``ok``, ``error``, ``cancelled`` or ``""`` (no end)."""

    member: str
    pid: int
    topic: str
    partition: int
    offset: int
    attempt: int
    aggregate: str
    version: int
    fence: int
    start: float
    end: float | None = None
    outcome: str = ""

    def brief(self) -> str:
        end = "-" if self.end is None else f"{self.end:.3f}"
        return (
            f"{self.member}(pid {self.pid}) {self.topic}[{self.partition}]@{self.offset} "
            f"{self.aggregate} v{self.version} fence {self.fence} "
            f"{self.start:.3f}..{end} {self.outcome or 'no end'}"
        )


@dataclass(frozen=True)
class Lapse:
    """A member logged that its ownership of a partition lapsed (the core gave it up), or
    of every partition of ``topic`` (``partition`` None: its lease was not renewed)."""

    member: str
    topic: str
    partition: int | None
    at: float


@dataclass(frozen=True)
class Assign:
    """A member's core was assigned a partition (``Sink.assign``)."""

    member: str
    topic: str
    partition: int
    at: float


@dataclass(frozen=True)
class Pause:
    """The controller froze ``member`` (SIGSTOP) at ``frozen`` and thawed it at ``thawed``."""

    member: str
    frozen: float
    thawed: float


@dataclass
class History:
    """What the members logged."""

    runs: list[Run] = field(default_factory=list)
    lapses: list[Lapse] = field(default_factory=list)
    assigns: list[Assign] = field(default_factory=list)

    def extend(self, other: History) -> None:
        self.runs += other.runs
        self.lapses += other.lapses
        self.assigns += other.assigns


@dataclass
class Report:
    acknowledged: int = 0
    runs: int = 0
    handled: int = 0  # distinct acknowledged envelopes handled to an ok end
    duplicates: dict[Envelope, int] = field(default_factory=dict)  # handled > once
    unhandled: list[Envelope] = field(default_factory=list)  # (a)
    forward_skips: list[tuple[Run, list[int]]] = field(default_factory=list)  # (b)
    superseded_starts: list[tuple[Run, Run]] = field(default_factory=list)  # (c): run, newer
    starts_after_lapse: list[tuple[Run, Lapse]] = field(default_factory=list)  # (c)
    starts_after_pause: list[tuple[Run, Pause]] = field(default_factory=list)  # (c)
    fenced_overlaps: int = 0  # (d) overlaps with ordered fences: what the fence is for
    unordered_overlaps: list[tuple[Run, Run]] = field(default_factory=list)  # (d)
    unfenced_overlaps: list[tuple[Run, Run]] = field(default_factory=list)  # (d) unjudged
    unfenced_starts: int = 0  # runs with fence 0: (c) could not judge them
    lapses: int = 0

    @property
    def extra_runs(self) -> int:
        """Ok ends beyond the first, over all envelopes."""
        return sum(n - 1 for n in self.duplicates.values())

    def violations(self) -> dict[str, list[str]]:
        """Each failed check with its offending records (empty when all hold)."""
        found = {
            "a: acknowledged but never handled": [f"{a} v{v}" for a, v in self.unhandled],
            "b: forward skip": [
                f"{run.brief()} started before v{missing}" for run, missing in self.forward_skips
            ],
            "c: started under a superseded fence": [
                f"{run.brief()} | after {newer.brief()}" for run, newer in self.superseded_starts
            ],
            "c: started after its ownership lapsed": [
                f"{run.brief()} | lapse at {lapse.at:.3f}" for run, lapse in self.starts_after_lapse
            ],
            STARTED_AFTER_PAUSE: [
                f"{run.brief()} | frozen {pause.frozen:.3f}..{pause.thawed:.3f}"
                for run, pause in self.starts_after_pause
            ],
            "d: overlap without an older fence on the older run": [
                f"{first.brief()} | {second.brief()}" for first, second in self.unordered_overlaps
            ],
        }
        return {check: lines for check, lines in found.items() if lines}

    def summary(self) -> str:
        lines = [
            f"acknowledged {self.acknowledged}, handler runs {self.runs}, handled "
            f"{self.handled}, duplicates {len(self.duplicates)} envelopes "
            f"({self.extra_runs} extra runs), lapses logged {self.lapses}",
            f"overlaps across members: {self.fenced_overlaps} with ordered fences, "
            f"{len(self.unordered_overlaps)} unordered, {len(self.unfenced_overlaps)} "
            "unjudged (fence 0)",
        ]
        if self.unfenced_starts:
            lines.append(
                f"fence 0 (unknown) on {self.unfenced_starts} runs: the fence checks of c "
                "and d skipped for them"
            )
            lines.extend(
                f"  unjudged overlap: {first.brief()} | {second.brief()}"
                for first, second in self.unfenced_overlaps[:3]
            )
        for check, offending in self.violations().items():
            lines.append(f"VIOLATION {check}: {len(offending)}")
            lines.extend(f"  {line}" for line in offending[:10])
        return "\n".join(lines)


def check(
    acknowledged: Iterable[Envelope],
    runs: Iterable[Run],
    lapses: Iterable[Lapse] = (),
    *,
    assigns: Iterable[Assign] = (),
    pauses: Iterable[Pause] = (),
    ownership_timeout: float = math.inf,
    ended_by: Mapping[str, float] | None = None,
) -> Report:
    """Judge a history. ``ended_by``: when a member's process was known to end (a
    SIGKILL): its runs without an end count as running until then; without an entry,
    until the last moment of the history. ``pauses`` longer than ``ownership_timeout``
    (the session / lease) cost the member its partitions."""
    runs = sorted(runs, key=lambda r: r.start)
    lapses = list(lapses)
    acked = set(acknowledged)
    report = Report(acknowledged=len(acked), runs=len(runs), lapses=len(lapses))
    completions = Counter((r.aggregate, r.version) for r in runs if r.outcome == OK)
    report.handled = sum(1 for e in acked if completions[e])
    report.unhandled = sorted(acked - set(completions))
    report.duplicates = {e: n for e, n in completions.items() if n > 1}
    report.forward_skips = _forward_skips(runs)
    report.unfenced_starts = sum(1 for r in runs if r.fence == 0)
    report.superseded_starts = _superseded_starts(runs)
    report.starts_after_lapse = _starts_after_lapse(runs, list(assigns), lapses)
    report.starts_after_pause = _starts_after_pause(
        runs,
        list(assigns),
        [p for p in pauses if p.thawed - p.frozen > ownership_timeout],
        ownership_timeout,
    )
    horizon = max((r.end or r.start for r in runs), default=0.0)
    _judge_overlaps(runs, dict(ended_by or {}), horizon, report)
    return report


def _forward_skips(runs: list[Run]) -> list[tuple[Run, list[int]]]:
    started: dict[str, set[int]] = defaultdict(set)
    contiguous: dict[str, int] = defaultdict(int)  # 1..n all started
    skips = []
    for run in runs:
        seen, top = started[run.aggregate], contiguous[run.aggregate]
        if run.version > top + 1:
            missing = [v for v in range(top + 1, run.version) if v not in seen]
            if missing:
                skips.append((run, missing))
        seen.add(run.version)
        while top + 1 in seen:
            top += 1
        contiguous[run.aggregate] = top
    return skips


def _superseded_starts(runs: list[Run]) -> list[tuple[Run, Run]]:
    newest: dict[tuple[str, int], Run] = {}  # partition -> the run with its highest fence
    found = []
    for run in runs:
        if run.fence == 0:
            continue
        where = (run.topic, run.partition)
        top = newest.get(where)
        if top is None or run.fence > top.fence:
            newest[where] = run
        elif run.fence < top.fence:
            found.append((run, top))
    return found


def _starts_after_lapse(
    runs: list[Run], assigns: list[Assign], lapses: list[Lapse]
) -> list[tuple[Run, Lapse]]:
    found = []
    for lapse in lapses:
        found.extend(
            (run, lapse)
            for run in _started_unowned(runs, assigns, lapse.member, lapse.at)
            if run.topic == lapse.topic and lapse.partition in (None, run.partition)
        )
    return found


def _starts_after_pause(
    runs: list[Run], assigns: list[Assign], pauses: list[Pause], timeout: float
) -> list[tuple[Run, Pause]]:
    found = []
    for pause in pauses:
        lost = pause.frozen + timeout
        found.extend((run, pause) for run in _started_unowned(runs, assigns, pause.member, lost))
    return found


def _started_unowned(runs: list[Run], assigns: list[Assign], member: str, lost: float) -> list[Run]:
    """``member``'s runs that started at or after ``lost`` (when it lost its partitions)
    on a partition its core had not been assigned again since."""
    regained: dict[tuple[str, int], float] = {}  # the first assignment since ``lost``
    for assign in assigns:
        where = (assign.topic, assign.partition)
        if assign.member == member and lost <= assign.at < regained.get(where, math.inf):
            regained[where] = assign.at
    return [
        run
        for run in runs
        if run.member == member
        and run.start >= lost
        and regained.get((run.topic, run.partition), math.inf) > run.start
    ]


def _judge_overlaps(
    runs: list[Run], ended_by: dict[str, float], horizon: float, report: Report
) -> None:
    by_aggregate: dict[str, list[Run]] = defaultdict(list)
    for run in runs:  # sorted by start already
        by_aggregate[run.aggregate].append(run)

    def end_of(run: Run) -> float:
        if run.end is not None:
            return run.end
        return ended_by.get(run.member, horizon)

    for spans in by_aggregate.values():
        for i, first in enumerate(spans):
            until = end_of(first)
            for second in spans[i + 1 :]:
                if second.start >= until:
                    break
                if second.member == first.member:
                    continue
                if first.fence == 0 or second.fence == 0:
                    report.unfenced_overlaps.append((first, second))
                elif first.fence < second.fence:
                    report.fenced_overlaps += 1
                else:
                    report.unordered_overlaps.append((first, second))


def parse_member_log(lines: Iterable[str]) -> History:
    """A member's log (``tests/faults/member.py``), one JSON object a line: ``start``
    lines (the fields of :class:`Run` up to ``start``, and ``seq``) joined with their
    ``end`` line (``seq``, ``end``, ``outcome``); ``lapse`` and ``assign`` lines (one
    per partition) as they are. A torn last line (the process killed mid-write) is
    skipped."""
    starts: dict[int, dict[str, Any]] = {}
    ends: dict[int, dict[str, Any]] = {}
    history = History()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        kind = record.pop("ev")
        if kind == "lapse":
            history.lapses.append(Lapse(**record))
        elif kind == "assign":
            history.assigns.append(Assign(**record))
        else:
            (starts if kind == "start" else ends)[record.pop("seq")] = record
    history.runs = [Run(**start, **ends.get(seq, {})) for seq, start in starts.items()]
    return history
