"""Where a group stands in a topic's partitions, read from the server (``bus.lag()``).

A group's partition is consumed by a durable named ``consumer_name(group, p)_<epoch>``
(a new one per take-over, started at its predecessor's ack floor: :mod:`.group`), so the
consumer with the highest ack floor holds the group's position. Its pending plus
unacknowledged messages are the partition's lag. A partition the group never consumed has
no consumer: its lag is every message its subject holds.
"""

from __future__ import annotations

from nats.js import JetStreamContext

from keybus.topics import PartitionPosition
from keybus.transports.nats.client import Stream
from keybus.transports.nats.names import consumer_name

__all__ = ["group_positions"]


async def group_positions(
    js: JetStreamContext, stream: Stream, group: str
) -> list[PartitionPosition]:
    """Positions are stream sequences: ``committed`` is the next sequence after the
    group's ack floor, ``end`` the next sequence the stream gives."""
    consumers = await js.consumers_info(stream.name)
    info = await js.stream_info(stream.name, subjects_filter=">")
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
