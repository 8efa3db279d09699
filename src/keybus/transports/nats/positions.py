"""Where a group stands in a topic's partitions, read from the server (``bus.lag()``).

A group's partition is consumed by a durable named ``consumer_name(group, p)_<epoch>``
(a new one per take-over, started at its predecessor's ack floor: :mod:`.group`), so the
consumer with the highest ack floor holds the group's position. Its pending plus
unacknowledged messages are the partition's lag. A partition the group never consumed has
no consumer: its lag is every message its subject holds.

The server lists a stream's consumers a page (256) at a time, so every page is read:
the group's durables may be anywhere among other groups' and other services'. And the
stream may be shared with other subjects (a Go service's configured stream, thousands
of them): only the topic's subjects are counted.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from keybus.topics import PartitionPosition
from keybus.transports.nats.client import Stream
from keybus.transports.nats.names import consumer_name

__all__ = ["group_positions"]


async def group_positions(
    js: JetStreamContext, stream: Stream, group: str
) -> list[PartitionPosition]:
    """Positions are stream sequences: ``committed`` is the next sequence after the
    group's ack floor, ``end`` the next sequence the stream gives."""
    consumers = await _all_consumers(js, stream.name)
    info = await js.stream_info(stream.name, subjects_filter=_subjects_filter(stream.subjects))
    end = (info.state.last_seq or 0) + 1
    counts = info.state.subjects or {}
    out = []
    for partition, subject in enumerate(stream.subjects):
        prefix = f"{consumer_name(group, partition)}_"
        ours = [c for c in consumers if c.name.startswith(prefix)]
        if not ours:
            out.append(PartitionPosition(partition, None, end, counts.get(subject, 0)))
            continue
        current = max(ours, key=lambda c: c.ack_floor.stream_seq if c.ack_floor else 0)
        floor = current.ack_floor.stream_seq if current.ack_floor else 0
        lag = (current.num_pending or 0) + (current.num_ack_pending or 0)
        out.append(PartitionPosition(partition, floor + 1, end, lag))
    return out


async def _all_consumers(js: JetStreamContext, stream: str) -> list[ConsumerInfo]:
    """Every page of the stream's consumers. (Bounded by the caller's timeout: a page
    comes back empty once the offset passed the last consumer.)"""
    consumers: list[ConsumerInfo] = []
    while page := await js.consumers_info(stream, offset=len(consumers)):
        consumers.extend(page)
    return consumers


def _subjects_filter(subjects: tuple[str, ...]) -> str:
    """One filter that matches the topic's subjects: the subject itself, or the
    partitions' ``kb.<token>.*``."""
    if len(subjects) == 1:
        return subjects[0]
    heads = {subject.rpartition(".")[0] for subject in subjects}
    return f"{heads.pop()}.*" if len(heads) == 1 and "" not in heads else ">"
