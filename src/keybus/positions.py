"""Done-tracking: which positions may be committed.

Handlers finish out of order (different aggregates run concurrently), but a broker
position can only be committed as a prefix: committing offset 10 says 0..9 are done. So
each partition keeps its in-flight work in broker order, and the commit point advances
only over the contiguous run of finished work at its head.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterator

from keybus.message import Message
from keybus.partitioning import Partition
from keybus.work import DONE, Work


class DoneTracker:
    """Per-partition queues of work in broker order; reports each new commit point."""

    __slots__ = ("_on_commit", "_pending", "size")

    def __init__(self, on_commit: Callable[[Message], None]) -> None:
        self._on_commit = on_commit
        self._pending: dict[Partition, deque[Work]] = {}
        self.size = 0  # work tracked (taken in, not yet committed), all partitions

    def add(self, work: Work) -> None:
        """Record work in broker order (call in the order the consumer delivered it)."""
        queue = self._pending.get(work.partition)
        if queue is None:
            queue = self._pending[work.partition] = deque()
        queue.append(work)
        self.size += 1

    def done(self, work: Work) -> None:
        """Mark work done; if it unblocks the head of its partition, report the new
        commit point (the last message of the contiguous done prefix)."""
        work.state = DONE
        queue = self._pending.get(work.partition)
        if not queue or queue[0] is not work:
            return  # an earlier position is still open, or the partition was forgotten
        last = queue.popleft()
        popped = 1
        while queue and queue[0].state == DONE:
            last = queue.popleft()
            popped += 1
        self.size -= popped
        self._on_commit(last.message)

    def forget(self, partitions: Collection[Partition]) -> list[Work]:
        """Stop tracking these partitions; returns their work that is not done."""
        left: list[Work] = []
        for partition in partitions:
            queue = self._pending.pop(partition, None)
            if queue:
                self.size -= len(queue)
                left.extend(w for w in queue if w.state != DONE)
        return left

    def heads(self) -> Iterator[tuple[Work, int, int]]:
        """Per partition with tracked work: the oldest work not done (it holds the commit
        point), how many works behind it are done (held back by it) and how many are not
        done (itself included). Walks every tracked work: not for a hot path."""
        for queue in self._pending.values():
            if queue:
                done = sum(1 for w in queue if w.state == DONE)
                yield queue[0], done, len(queue) - done

    def open_work(self) -> Iterator[Work]:
        """Work not yet done, in no particular order across partitions."""
        for queue in self._pending.values():
            yield from (w for w in queue if w.state != DONE)

    def __len__(self) -> int:
        return self.size
