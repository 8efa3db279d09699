"""Done-tracking (``keybus.positions``): a partition commits only the end of its
contiguous done prefix, however out of order its messages finish."""

from __future__ import annotations

from keybus.message import Message
from keybus.positions import DoneTracker
from keybus.work import DONE, Work


def _work(offset: int, partition: int = 0) -> Work:
    return Work(Message("t", b"", None, {}, partition, offset), None, None)


def test_commit_point_advances_only_over_the_contiguous_done_prefix() -> None:
    commits: list[int] = []
    tracker = DoneTracker(lambda m: commits.append(m.offset))
    works = [_work(o) for o in (10, 11, 12, 15)]  # offsets may have gaps (compaction)
    for w in works:
        tracker.add(w)
    tracker.done(works[2])
    tracker.done(works[1])
    assert commits == [], "offset 10 is still open"
    tracker.done(works[0])
    assert commits == [12]
    tracker.done(works[3])
    assert commits == [12, 15]
    assert len(tracker) == 0


def test_partitions_are_tracked_independently_and_can_be_forgotten() -> None:
    commits: list[tuple[int, int]] = []
    tracker = DoneTracker(lambda m: commits.append((m.partition, m.offset)))
    a, b, c = _work(0, 0), _work(0, 1), _work(1, 1)
    for w in (a, b, c):
        tracker.add(w)
    tracker.done(b)
    assert commits == [(1, 0)]
    left = tracker.forget([("t", 0)])
    assert left == [a]
    tracker.done(a)  # finishing forgotten work commits nothing
    assert commits == [(1, 0)]
    assert a.state == DONE
