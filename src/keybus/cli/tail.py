"""``keybus tail``: print a topic's records as they arrive, like kcat for envelopes.

keybus subscribes from a group's committed position, or from the earliest record for a
group that has none; it cannot seek. So without ``--group`` tail reads in a fresh
private group (dropped by the backend on close: nothing is left committed) from the
earliest record, and chooses what to show from where each partition stood when it
started (``bus.lag`` of the fresh group: the end and the count of records held): a
record below the end is old, and of the old ones it shows the last N per partition
(``--last N``), none (the default: only records published after tail started) or all
(``--from-beginning``); every new record is shown as it arrives. The skipped records
are still read, so starting on a large topic takes the time to read it. With ``--group
G`` tail is a member of G like any other: it starts at G's committed position and
commits what it showed.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from pathlib import Path

import typer

from keybus.cli import common
from keybus.cli.show import print_record, record_json
from keybus.message import Message

__all__ = ["tail"]


class _Picker:
    """Which records to show. A record of partition p is old when its offset is below
    p's end as read at the start (on every backend a later record gets a higher offset
    or stream sequence), new otherwise: new records go straight through, old ones are
    dropped except the ``keep`` newest of each partition (by offset: keybus hands
    records over in each key's order, not the partition's), held until the partition's
    ``count`` old records were read and then shown in offset order. Should the count
    overstate (records removed by retention while tail read), the first new record of
    the partition shows what is held; old records after that are dropped."""

    def __init__(self, backlog: dict[int, tuple[int, int]], keep: float) -> None:
        self.ends = {p: end for p, (_, end) in backlog.items()}
        self.left = {p: count for p, (count, _) in backlog.items() if count > 0}
        self.keep = keep
        self.held: dict[int, list[tuple[int, int, Message]]] = {}
        self._seq = 0

    def offer(self, message: Message) -> list[Message]:
        """The records to show now that ``message`` arrived."""
        partition = message.partition
        if message.offset >= self.ends.get(partition, 0):
            self.left.pop(partition, None)
            return [*self._release(partition), message]
        if math.isinf(self.keep):
            return [message]
        if partition not in self.left:
            return []  # old, and the partition's newest old ones were shown already
        if self.keep > 0:
            held = self.held.setdefault(partition, [])
            self._seq += 1
            entry = (message.offset, self._seq, message)
            if len(held) < self.keep:
                heapq.heappush(held, entry)
            else:
                heapq.heappushpop(held, entry)
        self.left[partition] -= 1
        if self.left[partition] > 0:
            return []
        del self.left[partition]
        return self._release(partition)

    def _release(self, partition: int) -> list[Message]:
        return [m for _, _, m in sorted(self.held.pop(partition, []))]


def tail(
    url: str | None = common.URL,
    topic: str | None = typer.Argument(
        None, metavar="TOPIC", help="The topic to follow.", show_default=False
    ),
    envelope: bool = typer.Option(
        False, "--envelope", help="Decode each record as an envelope and show its fields."
    ),
    from_beginning: bool = typer.Option(
        False, "--from-beginning", help="Show every record the topic still holds first."
    ),
    last: int | None = typer.Option(
        None, "--last", min=0, help="Show the last N records of each partition first."
    ),
    group: str | None = typer.Option(
        None,
        "--group",
        help="Read as a member of this consumer group, from its committed position, and "
        "commit (default: a private group, dropped on exit).",
    ),
    key: str | None = typer.Option(None, "--key", help="Show only records with this key."),
    max_records: int = typer.Option(
        0, "--max", min=0, help="Exit after showing N records (0: follow until Ctrl-C)."
    ),
    as_json: bool = common.JSON,
    config: Path | None = common.CONFIG,
    connect_timeout: float = common.CONNECT_TIMEOUT,
) -> None:
    """Print a topic's records as they arrive (topic, partition, offset, key, headers,
    the envelope's fields and payload). Default: only records published after tail
    started. Ctrl-C or SIGTERM ends it (exit 0)."""
    where, (name,) = common.target(url, config, connect_timeout, topic)
    topic_name = common.topic_given(name)
    if from_beginning and last is not None:
        raise typer.BadParameter("--from-beginning and --last exclude each other")
    if group is not None and (from_beginning or last is not None):
        raise typer.BadParameter(
            "with --group, tail starts at the group's committed position: "
            "--from-beginning and --last need the private group (leave --group out)"
        )
    keep = math.inf if from_beginning else float(last or 0)

    async def follow(stop: asyncio.Event) -> int:
        return await _follow(
            where, topic_name, envelope, keep, group, key, max_records, as_json, stop
        )

    common.run(where, follow, follows=True)


async def _follow(
    where: common.Target,
    topic: str,
    envelope: bool,
    keep: float,
    group: str | None,
    key: str | None,
    max_records: int,
    as_json: bool,
    stop: asyncio.Event,
) -> int:
    async with common.open_bus(where, group) as bus:
        await bus.describe_topic(topic)  # a missing topic is an error, not a wait
        backlog: dict[int, tuple[int, int]] = {}
        if group is None:
            lag = await bus.lag(topic, bus.group)
            backlog = {row.partition: (row.lag, row.end) for row in lag.partitions}
        picker = _Picker(backlog, keep)
        shown = 0

        async def handle(message: Message) -> None:
            nonlocal shown
            for record in picker.offer(message):
                if (key is not None and record.key != key) or stop.is_set():
                    continue
                try:
                    if as_json:
                        common.emit_json(record_json(record, envelope))
                    else:
                        print_record(common.console, record, envelope)
                except BrokenPipeError:  # `keybus tail ... | head`: the reader is gone
                    common.detach_stdout()
                    stop.set()
                    return
                except Exception as exc:  # never fail a record: it would be retried
                    common.errors.print(f"cannot show {record.topic}[{record.partition}]: {exc!r}")
                shown += 1
                if max_records and shown >= max_records:
                    stop.set()

        # One at a time: the output is one stream. A handler that never raises never
        # retries nor dead-letters, so tail publishes nothing.
        await bus.subscribe(topic, handle, max_concurrency=1, max_attempts=1)
        common.errors.print(
            f"[dim]following {topic} on {where.shown} in group {bus.group} (Ctrl-C to stop)[/dim]"
        )
        await stop.wait()
    return 0
