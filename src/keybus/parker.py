"""The engine side of ``on_dead_letter="park"``: which keys of a subscription are parked,
parking their later messages, the ordered replay and the discard (the state, its store
and the read-back are in :mod:`keybus.parking`).

The hand-over of a replay: while it runs the key stays parked, so live messages of the
key are dead-lettered behind it as before, and each is also handed to the replay as its
dead letter is written (``handover``). The replay hands the dead letters it read back,
then those handed over meanwhile, and unparks the key in the same step that finds
nothing more handed over, with no await between: no live message of the key is handled
before a parked one, none is lost at the hand-over and none is handled twice (the
read-back and the hand-over are de-duplicated by offset).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING

from keybus.delivery import CURRENT
from keybus.envelope import Envelope
from keybus.errors import BusClosedError, KeybusError, ReplayError
from keybus.message import Message
from keybus.parked_requests import answer, pending, request_key
from keybus.parking import (
    PARKED_BEHIND,
    Parked,
    ParkedKey,
    encode,
    event_id_of,
    load,
    store_key,
    store_topic,
    to_replay,
)
from keybus.reloads import Reloads
from keybus.work import RUNNING, Work

if TYPE_CHECKING:
    from keybus.engine import SubscriptionEngine

__all__ = ["KeyParked", "Parking", "ReadTopic", "VersionGap"]

log = logging.getLogger("keybus")

ReadTopic = Callable[[str], Awaitable[list[Message]]]
_STORE_ATTEMPTS = 5
# How often a member owning a parked key looks for replay / discard requests in the store.
REQUEST_POLL = 2.0


class KeyParked(Exception):
    """The reason in a parked message's dead letter."""


class VersionGap(Exception):
    """The reason in the dead letter of an envelope whose version skipped ahead."""


class Parking:
    """The parked keys of one subscription and what is done with them."""

    def __init__(self, engine: SubscriptionEngine, read_topic: ReadTopic | None) -> None:
        self._engine = engine
        self._read = read_topic
        self.store = store_topic(engine.dead_letter_topic)
        self.parked: dict[str, Parked] = {}
        # Keys being replayed -> the live messages parked meanwhile, for the replay.
        self._handover: dict[str, list[Message]] = {}
        # The store is read before the first message and again after each assignment.
        self._reloads = Reloads(first=read_topic is not None)
        # Unparked here, the store's record saying so not written yet: a read of the store
        # meanwhile must not park them again.
        self._unparked: set[str] = set()
        # Requests started here whose answer the store may not show yet.
        self._answered: set[str] = set()

    @property
    def reload_due(self) -> bool:
        """A read is due, or running (then the caller waits for it in :meth:`refresh`)."""
        return self._reloads.due

    def assigned(self) -> None:
        """A partition was assigned: the store is to be read (again)."""
        self._reloads.assigned()

    @property
    def persistent(self) -> bool:
        return self._read is not None

    # -- the store ---------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the store if an assignment made it due (one reader; the rest wait)."""
        if self._read is not None:
            await self._reloads.run(self._read_store, self._reload, f"parked keys ({self.store})")

    async def _read_store(self) -> list[Message]:
        assert self._read is not None
        return await self._read(self.store)

    def _reload(self, records: list[Message]) -> None:
        found = load(records, self._engine.group)
        for key in self._unparked:
            found.pop(key, None)
        found.update(self.parked)  # ours are newer than what the store had
        self.parked = found

    def forget(self, partitions: Collection[int]) -> None:
        """Partitions revoked: their keys' state is the next owner's (re-read if they
        come back)."""
        for key in [k for k, s in self.parked.items() if s.partition in partitions]:
            if key not in self._handover:
                del self.parked[key]

    async def _write(self, key: str, state: Parked | None) -> bool:
        """Store ``key``'s state (``None``: unparked); whether the store took it."""
        return await self._store(store_key(self._engine.group, key), encode(state), {})

    async def _store(self, name: str, value: bytes, headers: dict[str, bytes]) -> bool:
        """Write a record to the store, retried; whether the store took it."""
        engine = self._engine
        for attempt in range(1, _STORE_ATTEMPTS + 1):
            try:
                await engine.publish_internal(self.store, value, name, headers)
                return True
            except BusClosedError:
                raise
            except KeybusError as exc:
                log.warning("keybus: writing parked key to %s failed: %s", self.store, exc)
                if attempt < _STORE_ATTEMPTS:  # no wait after the last: nothing follows
                    await asyncio.sleep(engine.options.backoff(attempt))
        log.error("keybus: a parked-keys record of %s not stored", engine.topic)
        return False

    # -- parking -----------------------------------------------------------------------

    async def dead_lettered(self, work: Work, reason: str, key: str | None) -> None:
        """``work`` was dead-lettered: park its key, unless it already is."""
        if key is None or key in self.parked:
            return
        message = work.message
        event_id = event_id_of(work.payload, self._engine.envelopes)
        state = Parked(message.partition, message.offset, event_id, reason, time.time())
        self.parked[key] = state
        self._engine.stats.parked += 1
        await self._write(key, state)

    async def park(self, work: Work, key: str, state: Parked) -> None:
        """Dead-letter ``work`` behind its parked key."""
        engine = self._engine
        message = work.message
        handover = self._handover.get(key)
        if handover is not None:
            handover.append(message)
        state.writing.append(message)
        behind = state.behind(engine.topic)
        try:
            await engine.dead_letter(
                work,
                KeyParked(f"key {key!r} is parked behind {behind.decode()}"),
                {PARKED_BEHIND: behind},
            )
        finally:
            state.writing.remove(message)
        if work.state == RUNNING and self.parked.get(key) is state:
            state.count += 1
            engine.stats.parked += 1
            await self._write(key, state)

    # -- requests from a process without the handler (keybus.parked_requests) ----------

    async def serve_requests(self) -> None:
        """Every :data:`REQUEST_POLL` seconds, while this member owns a parked key: read
        the store and perform the replay / discard requests for the keys it owns, in
        store order, as the API calls would (runs until cancelled with the
        subscription)."""
        while True:
            await asyncio.sleep(REQUEST_POLL)
            try:
                await self._serve_once()
            except BusClosedError:
                return
            except KeybusError as exc:  # the store unreadable now: the next round retries
                log.warning("keybus: reading requests from %s failed: %s", self.store, exc)

    async def _serve_once(self) -> None:
        await self.refresh()  # the store is read once per assignment, traffic or not
        engine = self._engine
        if not any(engine.owns(state.partition) for state in self.parked.values()):
            return  # nothing to replay here: no read (an idle service pays nothing)
        assert self._read is not None  # persistent: only then is this task started
        waiting = pending(await self._read(self.store), engine.group)
        self._answered &= {r.id for r in waiting}  # bounded: only those still listed
        for request in waiting:
            state = self.parked.get(request.key)
            if request.id in self._answered or state is None:
                continue
            if not engine.owns(state.partition):
                continue  # its partition's owner answers
            self._answered.add(request.id)
            handled, reason = 0, ""
            try:
                if request.action == "replay":
                    handled = await self.replay(request.key)
                    result = "replayed"
                else:
                    handled = await self.discard(request.key)
                    result = "discarded"
            except ReplayError as exc:
                result, handled, reason = "failed", exc.handled, exc.reason
            except ValueError as exc:  # a replay of the key already running
                result, reason = "refused", str(exc)
            except KeybusError:
                self._answered.discard(request.id)  # not done: the next round tries again
                raise
            value, headers = answer(request, result, handled, reason)
            await self._store(request_key(engine.group, request.key), value, headers)

    # -- operating ---------------------------------------------------------------------

    async def list(self) -> list[ParkedKey]:
        await self.refresh()  # not read yet if nothing was delivered since the start
        topic = self._engine.topic
        return [state.view(topic, key) for key, state in self.parked.items()]

    async def _owned(self, key: str) -> Parked | None:
        await self.refresh()
        state = self.parked.get(key)
        engine = self._engine
        if state is not None and not engine.owns(state.partition):
            raise ValueError(
                f"partition {state.partition} of {engine.topic!r} (key {key!r}) is owned by "
                "another member of the group: replay or discard it there"
            )
        if key in self._handover:
            raise ValueError(f"a replay of key {key!r} is running")
        return state

    async def replay(self, key: str) -> int:
        """Hand ``key``'s parked messages to the handler in order, then unpark it;
        the number handed. :class:`ReplayError` if one fails again (the key stays
        parked from that message on)."""
        state = await self._owned(key)
        if state is None:
            return 0
        if self._read is None:
            raise ValueError("this transport cannot read the dead letters back to replay")
        engine = self._engine
        handover = self._handover[key] = list(state.writing)
        handed = 0
        try:
            letters = await self._read(engine.dead_letter_topic)
            queue = to_replay(letters, engine.topic, engine.group, key, state)
            seen = {(m.partition, m.offset) for m in queue}
            while True:
                for message in queue:
                    payload, error = await self._replay_one(message)
                    if error is not None:
                        reason = f"{type(error).__name__}: {error}"
                        state.moved_to(message, event_id_of(payload, engine.envelopes), reason)
                        engine.stats.note_error(reason)
                        await self._write(key, state)
                        raise ReplayError(key, handed, reason) from error
                    handed += 1
                queue = [m for m in handover if (m.partition, m.offset) not in seen]
                handover.clear()
                if not queue:
                    break
                seen.update((m.partition, m.offset) for m in queue)
            # Nothing more handed over, and no await since: live messages flow from here.
            del self.parked[key]
            self._unparked.add(key)
        finally:
            del self._handover[key]
        if await self._write(key, None):
            self._unparked.discard(key)  # the store says so now
        return handed

    async def _replay_one(self, message: Message) -> tuple[object, BaseException | None]:
        """Run the handler on ``message``, retried as a delivery is: what it was handed
        (``None``: an envelope that does not decode) and why it failed, if it did."""
        engine = self._engine
        payload: object = message
        if engine.envelopes:
            try:
                payload = Envelope.from_bytes(message.value)
            except Exception as exc:
                return None, exc
        work = Work(message, payload, None)
        work.state = RUNNING
        token = CURRENT.set(work)
        options = engine.options
        error: BaseException | None = None
        try:
            for attempt in range(1, options.max_attempts + 1):
                work.attempts = attempt
                try:
                    await engine.attempt(work)
                except Exception as exc:
                    error = exc
                else:
                    engine.handled_by_replay(payload, message.partition)
                    return payload, None
                if attempt < options.max_attempts:
                    await asyncio.sleep(options.backoff(attempt))
        finally:
            CURRENT.reset(token)
        return payload, error

    async def discard(self, key: str) -> int:
        """Drop ``key``'s parked messages (recorded in the dead-letter topic) and unpark
        it; how many were parked."""
        state = await self._owned(key)
        if state is None:
            return 0
        engine = self._engine
        del self.parked[key]
        self._unparked.add(key)
        await engine.publish_internal(
            engine.dead_letter_topic,
            b"",
            key,
            {
                "X-Discarded": str(state.count).encode(),
                "X-Original-Topic": engine.topic.encode(),
                "X-Group": engine.group.encode(),
                PARKED_BEHIND: state.behind(engine.topic),
            },
        )
        if await self._write(key, None):
            self._unparked.discard(key)  # the store says so now
        return state.count
