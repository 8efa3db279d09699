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

The same fresh start ("re-take") repairs a partition whose deliveries may have been lost
on the wire: after every reconnect, and whenever the consumer sequence in a reply subject
(``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>...``) skips a number. JetStream
counts lost deliveries as delivered, so pulling on would hand out newer messages first
and an ack-all of them would acknowledge the lost ones. A re-take stops pulling, revokes
the partition through the core (which reports its done prefix — never past the gap, as
the core never saw anything after it), acks that prefix synchronously and lets the next
rebalance round (immediately) start a new consumer at ``ack_floor + 1``.

Every task a member owns is supervised: the coordinator and the acker log a crash and
restart, a crashed pull task re-takes its partition. Nothing stalls silently.
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
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import api
from nats.js.kv import KeyValue

from keybus._aio import cancel_and_wait
from keybus.deadline import Deadline
from keybus.errors import KeybusError
from keybus.groups import ANONYMOUS_GROUP_PREFIX
from keybus.message import Message
from keybus.partitioning import assign_partitions
from keybus.transports.base import Consumer, Sink
from keybus.transports.nats_headers import NatsHeaders, decode_key
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

# What a failing NATS call can raise: the client's errors (JetStream's derive from them),
# timeouts and socket errors.
NATS_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, TimeoutError, OSError)
# A failed rebalance round is retried at the next heartbeat; these are what it may raise
# (KeyError/ValueError: a group-state entry written by something else).
_ROUND_ERRORS: tuple[type[BaseException], ...] = (*NATS_ERRORS, KeybusError, KeyError, ValueError)
_ACK = b"+ACK"
_IN_PROGRESS = b"+WPI"
_CONSUMER_DELETED = "Consumer Deleted"  # the description of a 409 status
_ACK_INTERVAL = 0.005  # seconds between two asynchronous acks of one partition
# Budgets inside the core's bounds (it gives flush 2 s and close 2 s): a server that does
# not answer must not make the core cancel us half-way through our cleanup.
_FLUSH_BUDGET = 1.0
_CLOSE_BUDGET = 1.0

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
        self.last_cseq = 0  # consumer sequence of the last delivery received
        # Deliveries lost (a consumer-sequence gap, a reconnect, a crashed pull task):
        # stop pulling, and the coordinator re-takes the partition afresh.
        self.broken = False
        # Delivered chunks (in stream order) not yet wholly committed, with the time they
        # arrived, for in-progress acks: bookkeeping per chunk, not per message.
        self.delivered: deque[tuple[float, list[Message]]] = deque()
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
        # Deliveries in flight when the connection broke are lost, and JetStream counts
        # them as delivered: re-take every partition at its ack floor.
        for part in self._parts.values():
            part.broken = True
            part.wake.set()
        self._wake.set()

    def abort(self) -> None:
        """Cancel every task this member owns, without any network step (the transport
        is closing under a member whose close was cut short)."""
        self._closed = self._stopping = True
        for task in self._tasks():
            task.cancel()

    async def aborted(self) -> None:
        tasks = [task for task in self._tasks() if not task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    def _tasks(self) -> list[asyncio.Task[None]]:
        tasks = [self._coordinator, self._acker, *(part.task for part in self._parts.values())]
        return [task for task in tasks if task is not None]

    # -- Consumer --------------------------------------------------------------------

    async def start(self) -> None:
        transport = self._transport
        try:
            self._info = await transport.topic_info(self._topic)
            await transport.ensure_bucket()
            nc, js = transport.live()
            self._kv = await js.key_value(GROUPS_BUCKET)
            self._ping_sub = await nc.subscribe(self._ping, cb=self._on_ping)
        except KeybusError:
            raise
        except NATS_ERRORS as exc:
            what = f"cannot join group {self._group!r} on topic {self._topic!r}"
            raise transport.admin_error(what, exc) from exc
        transport.register(self)
        self._registered = True
        loop = asyncio.get_running_loop()
        self._acker = loop.create_task(
            self._supervised("acker", self._ack_loop), name=f"keybus-nats-ack:{self._topic}"
        )
        self._coordinator = loop.create_task(
            self._supervised("coordinator", self._coordinate),
            name=f"keybus-nats-group:{self._topic}",
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
        while delivered and delivered[0][1][-1].offset <= seq:
            delivered.popleft()
        if not self._ack_wake.is_set():
            self._ack_wake.set()

    async def flush(self, deadline: Deadline) -> None:
        await self._sync_acks(list(self._parts.values()), min(_FLUSH_BUDGET, self._api_timeout()))

    async def stop(self, deadline: Deadline) -> None:
        self._stopping = True
        for part in list(self._parts.values()):
            await self._stop_pulling(part)

    async def close(self, deadline: Deadline) -> None:
        if self._closed:
            return
        self._closed = self._stopping = True
        try:
            # Local steps first (they cannot hang): our tasks end before any network step,
            # so a cancellation by the core's bound can only cut the network part short.
            # Both are cancelled before either is waited for: a close cut short while
            # waiting for the first must not leave the second running.
            await cancel_and_wait(self._coordinator, self._acker)
            for part in list(self._parts.values()):
                await self._stop_pulling(part)
            if self._kv is not None:
                try:
                    async with asyncio.timeout(min(_CLOSE_BUDGET, self._api_timeout())):
                        await self._leave()
                except Exception as exc:
                    log.warning("keybus: leaving group %s cleanly failed: %r", self._group, exc)
        finally:
            for part in list(self._parts.values()):  # if leaving failed
                part.lost = True
                await _stop_pulling_now(part)
            self._parts.clear()
            sub, self._ping_sub = self._ping_sub, None
            if sub is not None:
                await _unsubscribe(sub)
            if self._registered:
                self._registered = False
                self._transport.unregister(self)

    def _api_timeout(self) -> float:
        return self._options.api_timeout

    async def _supervised(self, what: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run ``body`` (a loop that should never end); if it crashes, log it and run it
        again after a short pause, so an owned task never dies silently."""
        pause = 0.05
        # Not ``while True``: should a cancellation ever get lost inside ``body`` (swallowed
        # by some library on the way), the task still ends once the member is closed.
        while not self._closed:
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "keybus: %s/%s: the %s crashed; restarting it", self._topic, self._group, what
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, self._options.heartbeat)

    # -- coordination ----------------------------------------------------------------

    async def _on_ping(self, msg: Msg) -> None:
        if msg.data != self._id.encode():
            self._wake.set()

    async def _coordinate(self) -> None:
        """Rebalance rounds. Never dies of a failed round (every error is caught and the
        round retried), and never holds partitions past its lease: the wait between
        rounds and every network step of a round end when the lease does, and then the
        partitions are revoked before anyone else may take them."""
        heartbeat = self._options.heartbeat
        while not self._closed:  # see _supervised
            self._wake.clear()
            try:
                if self._parts and time.monotonic() >= self._lease_until:
                    # Could not renew in time: another member may take these any moment.
                    log.warning(
                        "keybus: %s/%s: lease not renewed, revoking", self._topic, self._group
                    )
                    await self._release(list(self._parts), lost=True)
                await self._round(leaving=False)
            except asyncio.CancelledError:
                raise
            except _ROUND_ERRORS as exc:
                log.debug("keybus: %s/%s rebalance round failed: %r", self._topic, self._group, exc)
            except Exception:
                log.exception("keybus: %s/%s rebalance round failed", self._topic, self._group)
            wait = heartbeat
            if self._parts:
                wait = max(0.05, min(wait, self._lease_until - time.monotonic()))
            await _wait(self._wake, wait)

    def _network_budget(self) -> float:
        """Seconds one network step of a round may take: at most ``api_timeout``, and
        while we own partitions never past the moment we must give them up."""
        budget = self._options.api_timeout
        if self._parts:
            budget = min(budget, self._lease_until - time.monotonic())
        return max(0.0, budget)

    async def _read(self) -> tuple[State, int | None]:
        assert self._kv is not None
        try:
            entry = await self._kv.get(self._key)
        except nats.js.errors.KeyNotFoundError:
            return {"m": {}, "o": {}}, None
        return _parse_state(entry.value, time.time()), entry.revision

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
        return assign_partitions(order, self._info.partitions)

    async def _leave(self) -> None:
        state = await self._round(leaving=True)
        if state["m"] or not self._group.startswith(ANONYMOUS_GROUP_PREFIX) or self._info is None:
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
        broken = [p for p, part in self._parts.items() if part.broken]
        if broken:
            # Re-take: give them up here (done prefix acked); the write below drops our
            # claim and, if they are still ours to have, claims them again in the same
            # compare-and-set, and _take starts a fresh consumer at the ack floor.
            await self._release(broken, lost=False)
        async with asyncio.timeout(self._network_budget()):
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

        async with asyncio.timeout(self._network_budget()):
            state = await self._write(change)
        if stolen:
            await self._release(stolen, lost=True)
        for p in taken:
            async with asyncio.timeout(self._network_budget()):
                await self._take(p)
        desired = self._desired(state)
        if all(p in self._parts for p, m in desired.items() if m == me):
            self._settled.set()
        if release or taken or broken or leaving or not was_member:
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
            deadline = Deadline.passed() if lost else Deadline.after(self._sink.revoke_timeout)
            await self._sink.revoke([(self._topic, part.partition) for part in parts], deadline)
        finally:
            await cancel_and_wait(keeper)
        # Bounded by the lease too: the keeper has stopped, and the partitions we keep must
        # be revoked (by the coordinator, once this returns) before anyone may take them.
        await self._sync_acks(parts, self._network_budget())
        for part in parts:
            if self._parts.get(part.partition) is part:
                del self._parts[part.partition]

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
            try:
                async with asyncio.timeout(self._network_budget()):
                    await self._write(renew)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("keybus: %s: renewing leases failed: %r", self._topic, exc)
            if time.monotonic() >= self._lease_until:
                # Not renewed in time: others may take every partition we hold any moment.
                # Stop fetching and acking, and cancel their running handlers now (the
                # revoke in progress may wait for its handlers up to revoke_timeout, past
                # the lease; the other partitions' handlers would run on meanwhile). The
                # revoke in progress then ends at once; the coordinator finishes the job.
                parts = list(self._parts.values())
                for part in parts:
                    part.lost = True
                    if part.task is not None:
                        part.task.cancel()
                await self._sink.revoke(
                    [(self._topic, part.partition) for part in parts], Deadline.passed()
                )
                return

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
        # Noted before the create: a cancellation while waiting for its reply may leave it
        # on the server, and the last member of an anonymous group deletes what it noted.
        self._created.add(name)
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
        for old in previous:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(info.stream, old.name)
        part = _Part(partition, name)
        part.committed = part.synced = part.acked = floor  # (a late commit of an old epoch)
        # Registered before the subscription exists, so a cancellation cannot leak it.
        self._parts[partition] = part
        try:
            part.sub = await nc.subscribe(nc.new_inbox(), cb=self._on_message(part))
        except BaseException:
            del self._parts[partition]
            raise
        self._sink.assign([(self._topic, partition)])
        part.task = asyncio.get_running_loop().create_task(
            self._pull_supervised(part), name=f"keybus-nats-pull:{self._topic}:{partition}"
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
            if status == "408" and left and left.isdigit():
                part.requested = max(0, part.requested - int(left))
            else:
                part.requested = 0
                description = (msg.headers or {}).get(api.Header.DESCRIPTION, "")
                if status == "503" or (status == "409" and description == _CONSUMER_DELETED):
                    # Our consumer is gone (topic deleted, or taken over): asking again
                    # would only bring another 503 at once, forever. Re-take instead.
                    part.broken = True
            wake.set()

        return on_message

    async def _pull_supervised(self, part: _Part) -> None:
        try:
            await self._pull(part)
        except asyncio.CancelledError:
            raise
        except Exception:
            # What reached the core is unknown: re-take from the ack floor.
            log.exception(
                "keybus: %s/%d: pulling crashed; re-taking the partition",
                self._topic,
                part.partition,
            )
            part.broken = True
            self._wake.set()

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
            if part.broken:
                self._wake.set()  # the coordinator re-takes the partition
                return
            if part.buffer:
                received, part.buffer = part.buffer, []
                part.activity = now = time.monotonic()
                messages = []
                for msg in received:
                    message = convert(msg, part)
                    if part.broken:
                        break  # a gap: nothing from here on may reach the core
                    if message is not None:
                        messages.append(message)
                if messages:
                    part.delivered.append((now, messages))
                    await deliver(messages)
                continue
            if part.requested < 0:
                part.requested = 0
            if time.monotonic() - part.activity > silent_after:
                part.requested = 0  # no heartbeat: the server lost our request
            if part.requested <= batch // 2:
                # Keep a second request queued so delivery never waits for a round trip.
                with contextlib.suppress(*NATS_ERRORS):
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
        cseq = int(tokens[6 + shift])
        if cseq != part.last_cseq + 1:
            if cseq <= part.last_cseq:
                return None  # a delivery we already had (cannot happen; never twice)
            # Every delivery — redeliveries too — takes the next consumer sequence: one
            # skipped means deliveries were lost on the wire, which JetStream counts as
            # delivered. Acking anything after them would acknowledge them unprocessed.
            log.warning(
                "keybus: %s/%d: deliveries %d..%d were lost; re-taking the partition",
                self._topic,
                part.partition,
                part.last_cseq + 1,
                cseq - 1,
            )
            part.broken = True
            return None
        part.last_cseq = cseq
        seq = int(tokens[5 + shift])
        if seq <= part.last_seq:
            # Redelivered after ack_wait: with no delivery lost in this epoch (checked
            # above), its first delivery is with the core.
            return None
        part.last_seq = seq
        stamp = int(tokens[7 + shift]) / 1e9
        key, headers = decode_key(msg), NatsHeaders(msg)
        return Message(self._topic, msg.data, key, headers, part.partition, seq, stamp, msg)

    async def _stop_pulling(self, part: _Part) -> None:
        await cancel_and_wait(part.task)
        await _stop_pulling_now(part)

    # -- acks ------------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        """Asynchronous acks of done prefixes, and the in-progress acks every
        ``ack_wait / 3`` (here, not in the coordinator: a slow KV round must not delay
        them into a redelivery)."""
        nc, _ = self._transport.live()
        interval = self._options.ack_wait / 3
        keep_alive_at = time.monotonic() + interval
        while not self._closed:  # see _supervised
            left = keep_alive_at - time.monotonic()
            if left > 0 and not self._ack_wake.is_set():
                await _wait(self._ack_wake, left)
            if time.monotonic() >= keep_alive_at:
                keep_alive_at = time.monotonic() + interval
                await self._keep_alive(nc, interval)
            if not self._ack_wake.is_set():
                continue
            self._ack_wake.clear()
            for part in list(self._parts.values()):
                if part.committed > part.acked and not part.lost:
                    part.acked = part.committed
                    # AckPolicy.ALL: acking the end of the done prefix acks all before it.
                    with contextlib.suppress(*NATS_ERRORS):
                        await nc.publish(part.commit_reply, _ACK)
            # Coalesce: at most one ack per partition per interval, however many commits
            # arrive meanwhile (flush and hand-overs ack synchronously, not through here).
            await asyncio.sleep(_ACK_INTERVAL)

    async def _sync_acks(self, parts: Iterable[_Part], budget: float) -> None:
        """Ack each part's done prefix and wait for the server to confirm, all at once,
        within ``budget`` seconds."""
        todo = [part for part in parts if part.committed > part.synced and not part.lost]
        if not todo:
            return
        nc, _ = self._transport.live()

        async def ack(part: _Part) -> None:
            seq = part.committed
            try:
                await nc.request(part.commit_reply, _ACK, timeout=budget)
            except nats.errors.NoRespondersError:
                # The consumer is gone (topic deleted, or taken over): nothing to ack.
                log.debug("keybus: ack of %s/%d: no consumer", self._topic, seq)
            except NATS_ERRORS as exc:
                log.warning("keybus: ack of %s/%d failed: %r", self._topic, seq, exc)
            else:
                part.synced = part.acked = max(part.acked, seq)

        await asyncio.gather(*(ack(part) for part in todo))

    async def _keep_alive(self, nc: Any, interval: float) -> None:
        """In-progress acks for delivered, uncommitted messages: a long handler keeps its
        message instead of JetStream redelivering it after ``ack_wait``. Chunks that
        arrived less than half an interval ago are skipped (the next round reaches them
        well within ``ack_wait``), so a busy partition sends few."""
        young = time.monotonic() - interval / 2
        publish = nc.publish
        for part in list(self._parts.values()):
            if part.lost or part.broken:
                continue
            committed = part.committed
            for arrived, chunk in list(part.delivered):
                if arrived > young:
                    break
                for message in chunk:
                    if message.offset > committed:
                        with contextlib.suppress(*NATS_ERRORS):
                            await publish(message.raw.reply, _IN_PROGRESS)
            for msg in list(part.buffer):  # received, waiting for room in the core
                with contextlib.suppress(*NATS_ERRORS):
                    await publish(msg.reply, _IN_PROGRESS)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` s. (Not ``wait_for``: on Python 3.11 it can
    swallow a cancellation that arrives as the event fires, leaving the task running.)"""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


def _parse_state(value: bytes | None, now: float) -> State:
    """A group-state entry, keeping only well-formed, unexpired members and claims (the
    entry may have been written by something else; the next write repairs it)."""
    try:
        raw = json.loads(value or b"{}")
    except ValueError:
        raw = {}
    if not isinstance(raw, dict):
        raw = {}
    state: State = {"m": {}, "o": {}}
    members = raw.get("m")
    if isinstance(members, dict):
        for member, value_ in members.items():
            if (
                isinstance(value_, list)
                and len(value_) == 2
                and all(_is_number(v) for v in value_)
                and value_[1] > now
            ):
                state["m"][member] = value_
    owners = raw.get("o")
    if isinstance(owners, dict):
        for partition, value_ in owners.items():
            if (
                partition.isdigit()
                and isinstance(value_, list)
                and len(value_) == 2
                and isinstance(value_[0], str)
                and _is_number(value_[1])
                and value_[1] > now
            ):
                state["o"][str(int(partition))] = value_
    return state


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


async def _stop_pulling_now(part: _Part) -> None:
    """Cancel the pull task (without waiting for it) and drop the subscription."""
    if part.task is not None and not part.task.done():
        part.task.cancel()
    part.task = None
    sub, part.sub = part.sub, None
    if sub is not None:
        await _unsubscribe(sub)


async def _unsubscribe(sub: NatsSubscription) -> None:
    # nats-py removes the interest locally (and stops the subscription's task) before
    # its first await, which only queues an UNSUB: a cancellation cannot leave it behind.
    with contextlib.suppress(*NATS_ERRORS):
        await sub.unsubscribe()
