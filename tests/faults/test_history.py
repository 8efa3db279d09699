"""The fault-injection test's history checker on synthetic histories: a clean one passes
(duplicates and fenced overlaps counted, not failed), and each kind of violation is
found with its offending records."""

from __future__ import annotations

import json
from dataclasses import replace

from tests.faults.history import (
    STARTED_AFTER_PAUSE,
    Assign,
    Lapse,
    Pause,
    Run,
    check,
    parse_member_log,
)

TOPIC = "t"


def run(
    member: str,
    version: int,
    start: float,
    end: float | None,
    *,
    fence: int = 1,
    aggregate: str = "a",
    partition: int = 0,
    outcome: str | None = None,
) -> Run:
    return Run(
        member=member,
        pid=hash(member) % 10_000,
        topic=TOPIC,
        partition=partition,
        offset=version,
        attempt=1,
        aggregate=aggregate,
        version=version,
        fence=fence,
        start=start,
        end=end,
        outcome=("ok" if end is not None else "") if outcome is None else outcome,
    )


def acked(aggregate: str, last: int) -> set[tuple[str, int]]:
    return {(aggregate, v) for v in range(1, last + 1)}


def clean_history() -> list[Run]:
    """m1 owns partition 0 (fence 5) and freezes while v3 runs; m2 takes over (fence 9),
    handles v3 again and v4 while m1's v3 is still running, then m1's v3 ends."""
    return [
        run("m1", 1, 0.0, 0.1, fence=5),
        run("m1", 2, 0.2, 0.3, fence=5),
        run("m1", 3, 0.4, 9.0, fence=5),  # frozen mid-handler
        run("m2", 3, 7.0, 7.1, fence=9),
        run("m2", 4, 7.2, 7.3, fence=9),
        run("m2", 1, 0.0, 0.05, fence=2, aggregate="b", partition=1),
    ]


def test_a_clean_history_passes_and_counts_duplicates_and_fenced_overlaps() -> None:
    report = check(acked("a", 4) | acked("b", 1), clean_history())
    assert report.violations() == {}
    assert report.handled == 5
    assert report.duplicates == {("a", 3): 2}
    assert report.extra_runs == 1
    # m1's v3 (fence 5) overlaps m2's v3 and v4 (fence 9): what the fence is for.
    assert report.fenced_overlaps == 2
    assert "duplicates 1 envelopes (1 extra runs)" in report.summary()
    assert "VIOLATION" not in report.summary()


def test_an_acknowledged_envelope_never_handled_to_its_end_is_reported() -> None:
    history = [
        run("m1", 1, 0.0, 0.1),
        run("m1", 2, 0.2, 0.3, outcome="cancelled"),
        run("m1", 3, 0.4, None),  # killed while it ran
    ]
    report = check(acked("a", 3), history, ended_by={"m1": 0.5})
    assert report.unhandled == [("a", 2), ("a", 3)]
    assert list(report.violations()) == ["a: acknowledged but never handled"]


def test_a_forward_skip_is_reported_and_a_redelivery_is_not() -> None:
    history = [
        run("m1", 1, 0.0, 0.1),
        run("m1", 2, 0.2, 0.3),
        run("m1", 1, 0.4, 0.5),  # redelivered: older again, fine
        run("m1", 4, 0.6, 0.7),  # v3 never started before: a skip
        run("m1", 3, 0.8, 0.9),
    ]
    report = check(acked("a", 4), history)
    assert [(r.version, missing) for r, missing in report.forward_skips] == [(4, [3])]
    assert list(report.violations()) == ["b: forward skip"]


def test_versions_started_on_other_members_count_as_started() -> None:
    history = [
        run("m1", 1, 0.0, 0.1, fence=1),
        run("m2", 2, 1.0, 1.1, fence=2),
        run("m1", 3, 2.0, 2.1, fence=3),
    ]
    assert check(acked("a", 3), history).violations() == {}


def test_a_start_under_a_superseded_fence_is_reported() -> None:
    """m1 resumes after its lease ran out and starts queued v3 with fence 5, after m2
    had begun the partition with fence 9 (on another aggregate of it, even)."""
    history = [
        run("m1", 1, 0.0, 0.1, fence=5),
        run("m1", 2, 0.2, 0.3, fence=5),
        run("m2", 1, 7.0, 7.1, fence=9, aggregate="b"),
        run("m1", 3, 8.0, 8.1, fence=5),
    ]
    report = check(acked("a", 3) | acked("b", 1), history)
    assert [(old.version, newer.aggregate) for old, newer in report.superseded_starts] == [(3, "b")]
    assert list(report.violations()) == ["c: started under a superseded fence"]


def test_a_start_after_the_members_own_lapse_is_reported_until_it_is_assigned_again() -> None:
    history = [
        run("m1", 1, 0.0, 0.1, fence=5),
        run("m1", 2, 3.0, 3.1, fence=5),  # after the lapse, not re-taken yet: a violation
        run("m1", 3, 4.0, 4.1, fence=5),  # re-taken (same fence: Kafka's same generation)
        run("m1", 1, 2.5, 2.6, fence=2, aggregate="b", partition=1),  # not lapsed: fine
    ]
    lapse = Lapse("m1", TOPIC, 0, 2.0)
    assigns = [Assign("m1", TOPIC, 0, 0.0), Assign("m1", TOPIC, 1, 0.0)]
    report = check(
        acked("a", 3) | acked("b", 1),
        history,
        [lapse],
        assigns=[*assigns, Assign("m1", TOPIC, 0, 3.5)],
    )
    assert [(r.version, lapsed) for r, lapsed in report.starts_after_lapse] == [(2, lapse)]
    assert list(report.violations()) == ["c: started after its ownership lapsed"]
    assert report.lapses == 1


def test_a_lapse_of_the_whole_lease_covers_every_partition_of_the_topic() -> None:
    history = [
        run("m1", 1, 0.0, 0.1, fence=5),
        run("m1", 1, 0.2, 0.3, fence=6, aggregate="b", partition=1),
        run("m1", 2, 3.0, 3.1, fence=5),
        run("m1", 2, 3.2, 3.3, fence=6, aggregate="b", partition=1),
    ]
    report = check(acked("a", 2) | acked("b", 2), history, [Lapse("m1", TOPIC, None, 2.0)])
    assert sorted((r.aggregate, r.version) for r, _ in report.starts_after_lapse) == [
        ("a", 2),
        ("b", 2),
    ]
    other_topic = check(acked("a", 2) | acked("b", 2), history, [Lapse("m1", "u", None, 2.0)])
    assert other_topic.violations() == {}


def test_a_start_after_a_pause_past_the_ownership_before_a_new_assignment_is_reported() -> None:
    """m1 is frozen at 1.0 for 9 s, its session 6 s: at 7.0 its partitions were lost.
    After the thaw it starts queued v2 of partition 0 (a violation) before its core is
    assigned partition 0 again at 10.5; v3 after that is fine, and so is partition 1's
    v1, assigned again at 10.2."""
    history = [
        run("m1", 1, 0.0, 0.1),
        run("m1", 2, 10.0, 10.1),
        run("m1", 3, 11.0, 11.1),
        run("m1", 1, 10.3, 10.4, aggregate="b", partition=1),
    ]
    assigns = [
        Assign("m1", TOPIC, 0, 0.0),
        Assign("m1", TOPIC, 1, 10.2),
        Assign("m1", TOPIC, 0, 10.5),
    ]
    pause = Pause("m1", 1.0, 10.0)
    report = check(
        acked("a", 3) | acked("b", 1),
        history,
        assigns=assigns,
        pauses=[pause],
        ownership_timeout=6.0,
    )
    assert [(r.aggregate, r.version, p) for r, p in report.starts_after_pause] == [("a", 2, pause)]
    assert list(report.violations()) == [STARTED_AFTER_PAUSE]
    # A pause shorter than the session costs nothing.
    short = check(
        acked("a", 3) | acked("b", 1),
        history,
        assigns=assigns,
        pauses=[Pause("m1", 5.0, 10.0)],
        ownership_timeout=6.0,
    )
    assert short.violations() == {}


def test_overlapping_runs_without_an_older_fence_on_the_older_run_are_reported() -> None:
    equal = [run("m1", 1, 0.0, 1.0, fence=4), run("m2", 2, 0.5, 0.6, fence=4)]
    inverted = [run("m1", 1, 0.0, 1.0, fence=6), run("m2", 2, 0.5, 0.6, fence=4)]
    for history in (equal, inverted):
        report = check(acked("a", 2), history)
        assert len(report.unordered_overlaps) == 1
        assert "d: overlap without an older fence on the older run" in report.violations()
    # The inverted one also started under a superseded fence.
    assert len(check(acked("a", 2), inverted).superseded_starts) == 1


def test_a_killed_members_run_overlaps_until_its_kill_only() -> None:
    history = [run("m1", 1, 0.0, None, fence=4), run("m2", 1, 2.0, 2.1, fence=4)]
    assert check(acked("a", 1), history, ended_by={"m1": 1.0}).violations() == {}
    # Without the kill's moment it ran to the end of the history: an overlap, same fence.
    assert len(check(acked("a", 1), history).unordered_overlaps) == 1


def test_runs_of_one_member_never_count_as_overlaps() -> None:
    history = [run("m1", 1, 0.0, 1.0, fence=4), run("m1", 2, 0.5, 0.6, fence=4)]
    report = check(acked("a", 2), history)
    assert report.violations() == {}
    assert report.fenced_overlaps == 0


def test_fence_zero_is_unknown_overlaps_are_counted_unjudged_and_said() -> None:
    history = [
        run("m1", 1, 0.0, 1.0, fence=0),
        run("m2", 2, 0.5, 0.6, fence=0),
        run("m1", 2, 1.1, 1.2, fence=0),
    ]
    report = check(
        acked("a", 2), history, [Lapse("m1", TOPIC, 0, 0.7)], assigns=[Assign("m1", TOPIC, 0, 1.0)]
    )
    assert report.violations() == {}
    assert len(report.unfenced_overlaps) == 1
    assert report.unfenced_starts == 3
    assert "the fence checks of c and d skipped" in report.summary()


def test_member_log_lines_join_into_runs_and_a_torn_line_is_skipped() -> None:
    start = {
        "ev": "start",
        "seq": 0,
        "member": "m1",
        "pid": 42,
        "topic": TOPIC,
        "partition": 2,
        "offset": 17,
        "attempt": 1,
        "aggregate": "a",
        "version": 1,
        "fence": 3,
        "start": 1.5,
    }
    lines = [
        json.dumps(start),
        json.dumps({**start, "seq": 1, "version": 2, "start": 1.7}),
        json.dumps({"ev": "lapse", "member": "m1", "topic": TOPIC, "partition": 2, "at": 1.8}),
        json.dumps({"ev": "assign", "member": "m1", "topic": TOPIC, "partition": 2, "at": 1.0}),
        json.dumps({"ev": "end", "seq": 0, "end": 1.6, "outcome": "ok"}),
        '{"ev": "end", "seq": 1, "en',
    ]
    history = parse_member_log(lines)
    assert sorted(history.runs, key=lambda r: r.version) == [
        replace(run("m1", 1, 1.5, 1.6, fence=3, partition=2), pid=42, offset=17),
        replace(run("m1", 2, 1.7, None, fence=3, partition=2), pid=42, offset=17),
    ]
    assert history.lapses == [Lapse("m1", TOPIC, 2, 1.8)]
    assert history.assigns == [Assign("m1", TOPIC, 2, 1.0)]
