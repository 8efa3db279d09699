"""The version guard (``versions="strict"``): the last handled ``event_version`` of the
most recently seen aggregates, bounded, and — where the transport compacts topics and
reads them back (Kafka) — kept in the broker so that it survives a restart and moves
with its partition. (Elsewhere a store written at this rate would grow without bound.)

The store is a compacted topic beside the dead-letter topic,
``f"{dead_letter_topic}.versions"``, with one record per aggregate, keyed
``f"{group}/{aggregate}"``: ``{"p": partition, "v": version}`` (the last one wins).

The rule that makes it safe: a partition's commit is held until the versions of every
aggregate handled before it are in the store (:meth:`VersionStore.hold` and the flush
loop). So after a restart, or on the member that takes a partition over, every message
past the committed position is checked against the versions of all messages before it:
a duplicate re-delivered or re-published is skipped, a gap is seen. The price: commits
trail handling by up to :data:`FLUSH_INTERVAL` plus a store write, and one store record
per aggregate handled in each flush interval (several versions of one aggregate within
an interval cost one record).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import TYPE_CHECKING

from keybus.envelope import Envelope
from keybus.errors import BusClosedError, KeybusError
from keybus.message import Message
from keybus.reloads import Reloads

if TYPE_CHECKING:
    from keybus.engine import SubscriptionEngine

__all__ = ["VersionGuard", "VersionStore"]

log = logging.getLogger("keybus")

ReadTopic = Callable[[str], Awaitable[list[Message]]]
# How long handled versions (and the commits behind them) wait to be written together.
FLUSH_INTERVAL = 0.1


def store_topic(dead_letter_topic: str) -> str:
    return f"{dead_letter_topic}.versions"


class VersionGuard:
    """The last handled ``event_version`` of the most recently seen aggregates, at most
    ``size`` of them (least recently used forgotten first: a forgotten aggregate's next
    version is taken as it comes), each with the partition it came from."""

    __slots__ = ("_last", "_size", "dirty")

    def __init__(self, size: int, *, persistent: bool = False) -> None:
        self._size = size
        self._last: OrderedDict[str, tuple[int, int]] = OrderedDict()
        # Handled since the last flush, for the store (None: not stored).
        self.dirty: dict[str, tuple[int, int]] | None = {} if persistent else None

    def check(self, envelope: Envelope) -> int:
        """-1: a duplicate (not above the last handled), 1: a gap, 0: the next one."""
        last = self._last.get(envelope.aggregate_id)
        if last is None:
            return 0
        version = envelope.event_version
        if version <= last[0]:
            return -1
        return 1 if version > last[0] + 1 else 0

    def handled(self, envelope: Envelope, partition: int = 0) -> None:
        last = self._last
        aggregate = envelope.aggregate_id
        entry = last[aggregate] = (envelope.event_version, partition)
        last.move_to_end(aggregate)
        if len(last) > self._size:
            last.popitem(last=False)
        if self.dirty is not None:
            self.dirty[aggregate] = entry

    def learn(self, known: dict[str, tuple[int, int]]) -> None:
        """Versions read from the store (oldest first): taken where this guard knows
        nothing newer — what it handled itself since is."""
        last = self._last
        for aggregate, entry in known.items():
            if aggregate not in last:
                last[aggregate] = entry
                last.move_to_end(aggregate, last=False)  # older than what we handled
        while len(last) > self._size:
            last.popitem(last=False)

    def forget(self, partitions: Collection[int]) -> None:
        """Partitions revoked: their aggregates are the next owner's (re-read if they
        come back)."""
        for aggregate in [a for a, (_, p) in self._last.items() if p in partitions]:
            del self._last[aggregate]


def encode(version: int, partition: int) -> bytes:
    return b'{"p":%d,"v":%d}' % (partition, version)


def load(
    records: Iterable[Message], group: str, partitions: Collection[int], size: int
) -> dict[str, tuple[int, int]]:
    """The last version of each aggregate of ``group`` in ``partitions``, at most the
    ``size`` most recently written (unreadable records skipped)."""
    prefix = f"{group}/"
    latest: dict[str, tuple[int, int]] = {}
    for record in records:
        name = record.key
        if name is None or not name.startswith(prefix):
            continue
        try:
            value = json.loads(record.value)
            entry = (int(value["v"]), int(value["p"]))
        except (ValueError, KeyError, TypeError):
            continue
        aggregate = name[len(prefix) :]
        latest.pop(aggregate, None)  # re-inserted last: most recently written
        if entry[1] in partitions:
            latest[aggregate] = entry
    if len(latest) > size:
        latest = dict(list(latest.items())[-size:])
    return latest


class VersionStore:
    """The guard's versions in the broker, for one subscription: read on assignment,
    written before the commits that cover them."""

    def __init__(self, engine: SubscriptionEngine, guard: VersionGuard, read: ReadTopic) -> None:
        self._engine = engine
        self._guard = guard
        self._read = read
        self.store = store_topic(engine.dead_letter_topic)
        self._reloads = Reloads()  # read before the first message, after each assignment
        # Commits held until the versions before them are stored: partition -> message.
        self._held: dict[tuple[str, int], Message] = {}
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()

    # -- reading -----------------------------------------------------------------------

    @property
    def reload_due(self) -> bool:
        return self._reloads.due

    def assigned(self) -> None:
        self._reloads.assigned()

    async def refresh(self) -> None:
        """Read the store if an assignment made it due (one reader; the rest wait)."""
        await self._reloads.run(
            lambda: self._read(self.store), self._reload, f"versions ({self.store})"
        )

    def _reload(self, records: list[Message]) -> None:
        engine = self._engine
        owned = engine.owned_partitions()
        self._guard.learn(load(records, engine.group, owned, engine.options.version_window))

    # -- writing -----------------------------------------------------------------------

    def hold(self, message: Message) -> None:
        """A commit up to ``message``: made once the versions handled so far are stored."""
        self._held[(message.topic, message.partition)] = message
        self._wake.set()

    def forget(self, partitions: Collection[tuple[str, int]]) -> None:
        for partition in partitions:
            self._held.pop(partition, None)

    async def run(self) -> None:
        """The flush loop (until cancelled with the subscription)."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_INTERVAL)  # gather what comes meanwhile
            try:
                await self.flush()
            except BusClosedError:
                return
            except KeybusError as exc:  # kept: the next round writes them again
                log.warning("keybus: writing versions to %s failed: %s", self.store, exc)
                await asyncio.sleep(FLUSH_INTERVAL)

    async def flush(self) -> None:
        """Store the versions handled so far, then make the commits held until then."""
        async with self._flush_lock:
            guard, engine = self._guard, self._engine
            dirty, held = guard.dirty or {}, self._held
            # Taken together, with no await between: every held commit covers only work
            # whose versions are in ``dirty`` (a version is noted before its commit).
            guard.dirty, self._held = {}, {}
            self._wake.clear()
            try:
                await asyncio.gather(
                    *(
                        engine.publish_internal(
                            self.store, encode(version, partition), f"{engine.group}/{name}", {}
                        )
                        for name, (version, partition) in dirty.items()
                    )
                )
            except BaseException:
                # Not (all) stored: written again with what comes next; the commits wait.
                assert guard.dirty is not None
                guard.dirty = {**dirty, **guard.dirty}
                self._held = {**held, **self._held}
                self._wake.set()
                raise
            for message in held.values():
                engine.commit_now(message)
