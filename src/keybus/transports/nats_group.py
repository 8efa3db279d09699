"""One member of a consumer group on NATS: partition ownership and pulling.

JetStream has no consumer groups with partition assignment, so members coordinate
through one key-value entry per (topic, group) in the ``KEYBUS_GROUPS`` bucket::

    {"m": {member: [joined_at, lease_expires]}, "o": {"3": [member, lease_expires]}}

Every change is a compare-and-set on the entry's revision, so members never act on a
stale view. Partition ``p`` is *desired* by the ``p % n``-th live member in join order;
a member gives up a partition it should not have (revoking it through the core, then
acking the done prefix synchronously) *before* removing its claim, and takes a free
partition only through a successful compare-and-set. So a partition has at most one
owner at a time, and a key — which lives in one partition — is handled by one member at
a time. A member that dies stops renewing its leases; after ``lease_ttl`` others take
over. A member that cannot renew (server unreachable) revokes its partitions itself,
before its lease can have expired on the server.

Taking a partition creates a fresh durable consumer starting at the previous one's
``ack_floor + 1`` and deletes the previous one. Nothing the previous owner left pending
can then be redelivered behind newer messages, and acks addressed to the previous
consumer (a slow ex-owner's buffered acks) hit a consumer that no longer exists instead
of acking someone else's unprocessed gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import api
from nats.js.kv import KeyValue

from keybus.message import Message
from keybus.transports.base import Consumer, Sink
from keybus.transports.nats_headers import decode_headers
from keybus.transports.nats_names import (
    GROUPS_BUCKET,
    consumer_name,
    group_key,
    ping_subject,
    token,
)

if TYPE_CHECKING:
    from keybus.transports.nats import NatsTransport, _TopicInfo

__all__ = ["GroupMember"]

log = logging.getLogger("keybus.nats")

_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, TimeoutError, OSError)
# A failed rebalance round is retried at the next heartbeat; these are what it may raise
# (KeyError/ValueError: a group-state entry written by something else).
_ROUND_ERRORS: tuple[type[BaseException], ...] = (*_ERRORS, KeyError, ValueError)
_ANON_PREFIX = "keybus-anon-"  # EventBus names a bus without group= like this
_ACK = b"+ACK"
_IN_PROGRESS = b"+WPI"
_ACK_INTERVAL = 0.005  # seconds between two asynchronous acks of one partition

State = dict[str, dict[str, list[Any]]]


class _Part:
    """A partition this member owns, for one ownership epoch."""

    def __init__(self, partition: int, consumer: str) -> None:
        self.partition = partition
        self.consumer = consumer
        self.sub: NatsSubscription | None = None
        self.task: asyncio.Task[None] | None = None
        self.buffer: list[Msg] = []
        self.wake = asyncio.Event()
        self.requested = 0  # messages asked for by pull requests still open
        self.activity = time.monotonic()  # last message, heartbeat or status
        self.last_seq = 0  # highest stream sequence delivered in this epoch
        # Delivered chunks (in stream order) not yet wholly committed, for in-progress
        # acks: bookkeeping per chunk, not per message.
        self.delivered: deque[list[Message]] = deque()
        self.committed = 0  # stream sequence ending the done prefix
        self.commit_reply = ""
        self.acked = 0  # sent (asynchronously)
        self.synced = 0  # confirmed by the server
        self.lost = False  # ownership lost without a clean hand-over: never ack again


class GroupMember(Consumer):
    def __init__(self, transport: NatsTransport, topic: str, group: str, sink: Sink) -> None:
        self._transport = transport
        self._options = transport.options
        self._topic = topic
        self._group = group
        self._sink = sink
        self._id = uuid.uuid4().hex[:12]
        self._joined = time.time()
        self._key = group_key(topic, group)
        self._ping = ping_subject(topic, group)
        self._info: _TopicInfo | None = None
        self._kv: KeyValue | None = None
        self._parts: dict[int, _Part] = {}
        self._created: set[str] = set()
        self._ping_sub: NatsSubscription | None = None
        self._coordinator: asyncio.Task[None] | None = None
        self._acker: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._ack_wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._lease_until = 0.0
        self._last_keepalive = time.monotonic()
        self._stopping = False
        self._closed = False
        self._registered = False

    # -- setup (called by the transport) ---------------------------------------------

    @staticmethod
    async def ensure_bucket(transport: NatsTransport) -> None:
        _, js = transport.live()
        try:
            await js.key_value(GROUPS_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            await js.create_key_value(bucket=GROUPS_BUCKET, history=1, storage=api.StorageType.FILE)

    @staticmethod
    async def forget_topic(transport: NatsTransport, topic: str) -> None:
        _, js = transport.live()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.purge_stream(
                f"KV_{GROUPS_BUCKET}", subject=f"$KV.{GROUPS_BUCKET}.{token(topic)}.>"
            )

    def on_reconnected(self) -> None:
        for part in self._parts.values():
            part.requested = 0  # the server forgot our pull requests
            part.wake.set()
        self._wake.set()

    # -- Consumer --------------------------------------------------------------------

    async def start(self) -> None:
        transport = self._transport
        self._info = await transport.topic_info(self._topic)
        await transport.ensure_bucket()
        nc, js = transport.live()
        self._kv = await js.key_value(GROUPS_BUCKET)
        self._ping_sub = await nc.subscribe(self._ping, cb=self._on_ping)
        transport.register(self)
        self._registered = True
        loop = asyncio.get_running_loop()
        self._acker = loop.create_task(self._ack_loop(), name=f"keybus-nats-ack:{self._topic}")
        self._coordinator = loop.create_task(
            self._coordinate(), name=f"keybus-nats-group:{self._topic}"
        )
        # Partitions held by a crashed member come free when its lease runs out.
        try:
            await asyncio.wait_for(self._settled.wait(), self._options.lease_ttl + 2.0)
        except TimeoutError:
            log.warning("keybus: %s/%s: partitions not all assigned yet", self._topic, self._group)

    def commit(self, message: Message) -> None:
        part = self._parts.get(message.partition)
        seq = message.offset
        if part is None or part.lost or seq <= part.committed:
            return  # not ours any more: the next owner redoes it (at-least-once)
        part.committed = seq
        part.commit_reply = message.raw.reply
        delivered = part.delivered
        while delivered and delivered[0][-1].offset <= seq:
            delivered.popleft()
        if not self._ack_wake.is_set():
            self._ack_wake.set()

    async def flush(self) -> None:
        await self._sync_acks(list(self._parts.values()))

    async def stop(self) -> None:
        self._stopping = True
        for part in list(self._parts.values()):
            await self._stop_pulling(part)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.stop()
        await _cancel(self._coordinator)
        if self._kv is not None:
            try:
                await asyncio.wait_for(self._leave(), self._options.api_timeout)
            except _ROUND_ERRORS as exc:
                log.warning("keybus: leaving group %s cleanly failed: %r", self._group, exc)
        for part in list(self._parts.values()):  # if leaving failed
            await self._stop_pulling(part)
        self._parts.clear()
        await _cancel(self._acker)
        if self._ping_sub is not None:
            with contextlib.suppress(*_ERRORS):
                await self._ping_sub.unsubscribe()
        if self._registered:
            self._transport.unregister(self)

    # -- coordination ----------------------------------------------------------------

    async def _on_ping(self, msg: Msg) -> None:
        if msg.data != self._id.encode():
            self._wake.set()

    async def _coordinate(self) -> None:
        heartbeat = self._options.heartbeat
        while True:
            self._wake.clear()
            if self._parts and time.monotonic() > self._lease_until:
                # Could not renew in time: another member may take these any moment.
                log.warning("keybus: %s: lease not renewed, revoking", self._topic)
                await self._release(list(self._parts), lost=True)
            try:
                await self._round(leaving=False)
            except asyncio.CancelledError:
                raise
            except _ROUND_ERRORS as exc:
                log.debug("keybus: %s/%s rebalance round failed: %r", self._topic, self._group, exc)
            await self._keep_alive()
            await _wait(self._wake, heartbeat)

    async def _read(self) -> tuple[State, int | None]:
        assert self._kv is not None
        try:
            entry = await self._kv.get(self._key)
        except nats.js.errors.KeyNotFoundError:
            return {"m": {}, "o": {}}, None
        raw = json.loads(entry.value or b"{}")
        state: State = {"m": dict(raw.get("m", {})), "o": dict(raw.get("o", {}))}
        now = time.time()
        state["m"] = {m: v for m, v in state["m"].items() if v[1] > now}
        state["o"] = {p: v for p, v in state["o"].items() if v[1] > now}
        return state, entry.revision

    async def _write(self, change: Callable[[State, float], None]) -> State:
        """Read, apply ``change``, compare-and-set; retried on conflict."""
        assert self._kv is not None
        for attempt in range(20):
            started = time.monotonic()
            state, revision = await self._read()
            now = time.time()
            change(state, now)
            value = json.dumps(state).encode()
            try:
                if revision is None:
                    await self._kv.create(self._key, value)
                else:
                    await self._kv.update(self._key, value, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
                continue
            # Our claims hold on the server until now + lease_ttl; act as if they end a
            # heartbeat earlier, so we stop before anyone else may start.
            self._lease_until = started + self._options.lease_ttl - self._options.heartbeat
            return state
        raise TimeoutError("group state kept changing")

    def _desired(self, state: State) -> dict[int, str]:
        assert self._info is not None
        members = state["m"]
        order = sorted(members, key=lambda m: (members[m][0], m))
        n = self._info.partitions
        return {p: order[p % len(order)] for p in range(n)} if order else {}

    async def _leave(self) -> None:
        state = await self._round(leaving=True)
        if state["m"] or not self._group.startswith(_ANON_PREFIX) or self._info is None:
            return
        # The last member of an anonymous group (a bus without group=) is gone and nobody
        # can ever name that group again: drop its durables instead of leaving them behind.
        _, js = self._transport.live()
        for name in self._created:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(self._info.stream, name)
        assert self._kv is not None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._kv.purge(self._key)

    async def _round(self, *, leaving: bool) -> State:
        """One rebalance step: give up what is no longer ours, renew, take what is free."""
        me = self._id
        ttl = self._options.lease_ttl
        state, _ = await self._read()
        was_member = me in state["m"]
        if leaving:
            state["m"].pop(me, None)
        else:
            state["m"][me] = [self._joined, time.time() + ttl]
        desired = self._desired(state)
        owners = state["o"]
        lost = [p for p in self._parts if owners.get(str(p), [me])[0] != me]
        if lost:
            await self._release(lost, lost=True)
        release = [
            p for p in self._parts if leaving or (not self._stopping and desired.get(p) != me)
        ]
        if release:
            await self._release(release, lost=False)
        taken: list[int] = []
        stolen: list[int] = []

        def change(state: State, now: float) -> None:
            if leaving:
                state["m"].pop(me, None)
            else:
                state["m"][me] = [self._joined, now + ttl]
            owners = state["o"]
            for name, (member, _) in list(owners.items()):
                if member == me and int(name) not in self._parts:
                    del owners[name]
            stolen.clear()
            for partition in self._parts:
                holder = owners.get(str(partition))
                if holder is not None and holder[0] != me:
                    stolen.append(partition)
                else:
                    owners[str(partition)] = [me, now + ttl]
            taken.clear()
            if not leaving and not self._stopping:
                for partition, member in self._desired(state).items():
                    if member == me and str(partition) not in owners:
                        owners[str(partition)] = [me, now + ttl]
                        taken.append(partition)

        state = await self._write(change)
        if stolen:
            await self._release(stolen, lost=True)
        for p in taken:
            await self._take(p)
        desired = self._desired(state)
        if all(p in self._parts for p, m in desired.items() if m == me):
            self._settled.set()
        if release or taken or leaving or not was_member:
            nc, _ = self._transport.live()
            await nc.publish(self._ping, me.encode())
        return state

    async def _release(self, partitions: Iterable[int], *, lost: bool) -> None:
        parts = [self._parts[p] for p in partitions if p in self._parts]
        for part in parts:
            part.lost = part.lost or lost
            await self._stop_pulling(part)
        keeper = asyncio.get_running_loop().create_task(
            self._keep_leases(), name=f"keybus-nats-lease:{self._topic}"
        )
        try:
            # The core drops their queued messages, waits for their running handlers and
            # reports the done prefix (commit) before this returns.
            await self._sink.revoke([(self._topic, part.partition) for part in parts])
        finally:
            await _cancel(keeper)
        await self._sync_acks(parts)
        for part in parts:
            self._parts.pop(part.partition, None)

    async def _keep_leases(self) -> None:
        """Renew our leases while a revoke waits for handlers (the loop is busy)."""
        me = self._id
        ttl = self._options.lease_ttl

        def renew(state: State, now: float) -> None:
            if me in state["m"]:
                state["m"][me][1] = now + ttl
            for holder in state["o"].values():
                if holder[0] == me:
                    holder[1] = now + ttl

        while True:
            await asyncio.sleep(self._options.heartbeat)
            with contextlib.suppress(*_ERRORS):
                await self._write(renew)

    # -- partitions ------------------------------------------------------------------

    async def _take(self, partition: int) -> None:
        info = self._info
        assert info is not None
        nc, js = self._transport.live()
        options = self._options
        prefix = f"{consumer_name(self._group, partition)}_"
        previous = [c for c in await js.consumers_info(info.stream) if c.name.startswith(prefix)]
        # Consumers only ever start at their predecessor's floor, so the highest floor is
        # the group's committed position (leftovers of a crash mid-take have lower ones).
        floor = max((c.ack_floor.stream_seq for c in previous if c.ack_floor), default=0)
        name = f"{prefix}{uuid.uuid4().hex[:8]}"
        await js.add_consumer(
            info.stream,
            api.ConsumerConfig(
                name=name,
                durable_name=name,
                filter_subject=f"{info.subject_base}.{partition}",
                ack_policy=api.AckPolicy.ALL,
                deliver_policy=(
                    api.DeliverPolicy.BY_START_SEQUENCE if floor else api.DeliverPolicy.ALL
                ),
                opt_start_seq=floor + 1 if floor else None,
                ack_wait=options.ack_wait,
                max_ack_pending=options.max_ack_pending,
                max_deliver=-1,  # never give up on a message: the core decides
                replay_policy=api.ReplayPolicy.INSTANT,
            ),
        )
        self._created.add(name)
        for old in previous:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(info.stream, old.name)
        part = _Part(partition, name)
        part.sub = await nc.subscribe(nc.new_inbox(), cb=self._on_message(part))
        self._parts[partition] = part
        self._sink.assign([(self._topic, partition)])
        part.task = asyncio.get_running_loop().create_task(
            self._pull(part), name=f"keybus-nats-pull:{self._topic}:{partition}"
        )

    def _on_message(self, part: _Part) -> Callable[[Msg], Any]:
        wake = part.wake

        async def on_message(msg: Msg) -> None:
            if msg.reply:  # the hot path: a message (activity is noted when pulled)
                part.buffer.append(msg)
                part.requested -= 1
                wake.set()
                return
            # a status: 100 heartbeat, 408 request expired, 409 ...
            part.activity = time.monotonic()
            status = (msg.headers or {}).get("Status", "")
            if status == "100":
                return
            left = (msg.headers or {}).get("Nats-Pending-Messages")
            if status == "408" and left:
                part.requested = max(0, part.requested - int(left))
            else:
                part.requested = 0
            wake.set()

        return on_message

    async def _pull(self, part: _Part) -> None:
        info = self._info
        assert info is not None
        nc, _ = self._transport.live()
        options = self._options
        batch = options.fetch_batch
        request_subject = f"$JS.API.CONSUMER.MSG.NEXT.{info.stream}.{part.consumer}"
        request = json.dumps(
            {
                "batch": batch,
                "expires": int(options.fetch_expires * 1e9),
                "idle_heartbeat": int(options.idle_heartbeat * 1e9),
            }
        ).encode()
        assert part.sub is not None
        inbox = part.sub.subject
        silent_after = options.idle_heartbeat * 2.5
        convert = self._convert
        deliver = self._sink.deliver
        while True:
            if part.buffer:
                received, part.buffer = part.buffer, []
                part.activity = time.monotonic()
                messages = [m for m in map(convert, received, repeat(part)) if m is not None]
                if messages:
                    part.delivered.append(messages)
                    await deliver(messages)
                continue
            if part.requested < 0:
                part.requested = 0
            if time.monotonic() - part.activity > silent_after:
                part.requested = 0  # no heartbeat: the server lost our request
            if part.requested <= batch // 2:
                # Keep a second request queued so delivery never waits for a round trip.
                with contextlib.suppress(*_ERRORS):
                    await nc.publish(request_subject, request, reply=inbox)
                    part.requested += batch
                    part.activity = time.monotonic()
            part.wake.clear()
            if part.buffer:
                continue
            await _wait(part.wake, options.idle_heartbeat)

    def _convert(self, msg: Msg, part: _Part) -> Message | None:
        tokens = msg.reply.split(".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the v2
        # form with domain and account hash after "$JS.ACK".
        shift = 0 if len(tokens) == 9 else 2
        seq = int(tokens[5 + shift])
        if seq <= part.last_seq:
            return None  # redelivered within this epoch: the first delivery is with the core
        part.last_seq = seq
        key, headers = decode_headers(msg)
        stamp = int(tokens[7 + shift]) / 1e9
        return Message(self._topic, msg.data, key, headers, part.partition, seq, stamp, msg)

    async def _stop_pulling(self, part: _Part) -> None:
        await _cancel(part.task)
        part.task = None
        sub, part.sub = part.sub, None
        if sub is not None:
            with contextlib.suppress(*_ERRORS):
                await sub.unsubscribe()

    # -- acks ------------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        nc, _ = self._transport.live()
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            for part in list(self._parts.values()):
                if part.committed > part.acked and not part.lost:
                    part.acked = part.committed
                    # AckPolicy.ALL: acking the end of the done prefix acks all before it.
                    with contextlib.suppress(*_ERRORS):
                        await nc.publish(part.commit_reply, _ACK)
            # Coalesce: at most one ack per partition per interval, however many commits
            # arrive meanwhile (flush and hand-overs ack synchronously, not through here).
            await asyncio.sleep(_ACK_INTERVAL)

    async def _sync_acks(self, parts: Iterable[_Part]) -> None:
        nc, _ = self._transport.live()
        for part in parts:
            if part.committed > part.synced and not part.lost:
                seq = part.committed
                try:
                    await nc.request(part.commit_reply, _ACK, timeout=self._options.api_timeout)
                except _ERRORS as exc:
                    log.warning("keybus: ack of %s/%d failed: %r", self._topic, seq, exc)
                else:
                    part.synced = part.acked = max(part.acked, seq)

    async def _keep_alive(self) -> None:
        """In-progress acks for delivered, uncommitted messages: a long handler keeps its
        message instead of JetStream redelivering it after ``ack_wait``."""
        now = time.monotonic()
        if now - self._last_keepalive < self._options.ack_wait / 3:
            return
        self._last_keepalive = now
        nc, _ = self._transport.live()
        for part in list(self._parts.values()):
            committed = part.committed
            replies = [
                m.raw.reply for chunk in part.delivered for m in chunk if m.offset > committed
            ] + [m.reply for m in part.buffer]
            for reply in replies:
                with contextlib.suppress(*_ERRORS):
                    await nc.publish(reply, _IN_PROGRESS)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` s. (Not ``wait_for``: on Python 3.11 it can
    swallow a cancellation that arrives as the event fires, leaving the task running.)"""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
