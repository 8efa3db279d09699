"""One member of a consumer group on NATS: the Consumer the core sees, rebalance rounds,
giving partitions up and taking them.

JetStream has no consumer groups with partition assignment, so members coordinate
through one key-value entry per (topic, group) in the ``KEYBUS_GROUPS`` bucket
(:mod:`.group_state`: members in join order with a renewal token each, partition owners).
Every change is a compare-and-set on the entry's revision, so members never act on a
stale view. Partition ``p`` is *desired* by the ``p % n``-th live member in join
order; a member gives up a partition it should not have (revoking it through the core,
then acking the done prefix synchronously) *before* removing its claim, and takes a free
partition only through a successful compare-and-set. So a partition has at most one
owner at a time, and a key — which lives in one partition — is handled by one member at
a time. A member that dies stops renewing its leases; once another member has seen its
entry unchanged for ``lease_ttl`` (on its own monotonic clock: no two members' clocks
are ever compared) it takes over. A member that cannot renew (server unreachable) revokes
its partitions itself, a heartbeat before anyone else may take them; a revoke never
waits past the lease.

**Self-fencing.** Each owned partition's ownership deadline — the moment just before the
write that last renewed it was sent, plus ``lease_ttl`` minus a heartbeat, on this
member's monotonic clock — goes to the core with ``sink.assign(valid_until=...)`` and
``sink.renew``. The core starts no message of a partition past it, so a member whose
process stalled longer than its lease drops its queued work when it resumes instead of
running it next to the partition's new owner, and tells us (:meth:`GroupMember.lapsed`):
the partition is re-taken from its ack floor, or left to whoever owns it now. The revision
of the write that claimed a partition is its fence (``Message.fence``).

Taking a partition creates a fresh durable consumer starting at the previous one's
``ack_floor + 1`` and deletes the previous one. Nothing the previous owner left pending
can then be redelivered behind newer messages, and acks addressed to the previous
consumer (a slow ex-owner's buffered acks) hit a consumer that no longer exists instead
of acking someone else's unprocessed gap.

The same fresh start ("re-take") repairs a partition whose feed broke
(:mod:`.partition_feed`: deliveries lost on the wire, a reconnect, a crashed pull task,
a consumer deleted under us): the round revokes it through the core (which reports its
done prefix — never past a gap, as the core never saw anything after it), acks that
prefix synchronously and, in the same compare-and-set that keeps the claim, takes it
again at ``ack_floor + 1``.

Every task a member owns is supervised: the coordinator and the acker log a crash and
restart, a crashed pull task re-takes its partition. Nothing stalls silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import TypeVar

import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import api

from keybus._aio import cancel_and_wait, wait_event
from keybus.deadline import Deadline
from keybus.errors import KeybusError
from keybus.groups import ANONYMOUS_GROUP_PREFIX
from keybus.message import Message
from keybus.partitioning import Partition
from keybus.transports.base import Consumer, Sink
from keybus.transports.nats.bucket import GroupEntries, open_bucket
from keybus.transports.nats.client import Connection, Stream
from keybus.transports.nats.errors import NATS_ERRORS, translate
from keybus.transports.nats.group_state import (
    GroupState,
    RoundClaims,
    Sightings,
    Written,
    compare_and_set,
    next_renewal,
    read,
)
from keybus.transports.nats.names import consumer_name, group_key, ping_subject
from keybus.transports.nats.partition_feed import PartitionFeed, unsubscribe

__all__ = ["GroupMember"]

log = logging.getLogger("keybus.nats")
T = TypeVar("T")

# A failed rebalance round is retried at the next heartbeat; these are what it may raise.
_ROUND_ERRORS: tuple[type[BaseException], ...] = (*NATS_ERRORS, KeybusError)
_ACK_INTERVAL = 0.005  # seconds between two asynchronous acks of one partition
# Shares of the deadline the core gives flush and close. A healthy server answers in
# milliseconds; one that does not costs a close no more than these shares, and the rest
# stays for what must follow (close: the local cleanup, which the core must not cut off).
_FLUSH_SHARE = 0.5
_LEAVE_SHARE = 0.5
# How long start() waits past the lease for its partitions: partitions a crashed member
# held come free when its lease runs out, and taking them is one more round of network
# steps (each bounded by api_timeout, usually milliseconds).
_SETTLE_SLACK = 2.0


class GroupMember(Consumer):
    def __init__(self, conn: Connection, topic: str, group: str, sink: Sink) -> None:
        self._conn = conn
        self._options = conn.options
        self._topic = topic
        self._group = group
        self._sink = sink
        self._id = uuid.uuid4().hex[:12]
        # Who else is alive, as we see it on our own clock; our last renewal token.
        self._sightings = Sightings(self._id, conn.options.lease_ttl)
        self._renewal = 0.0
        self._key = group_key(topic, group)
        self._ping = ping_subject(topic, group)
        self._stream: Stream | None = None
        self._kv: GroupEntries | None = None
        self._attached: NatsClient | None = None  # the client _kv and _ping_sub are on
        self._feeds: dict[int, PartitionFeed] = {}
        self._created: set[str] = set()
        self._ping_sub: NatsSubscription | None = None
        self._coordinator: asyncio.Task[None] | None = None
        self._acker: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._ack_wake = asyncio.Event()
        self._settled = asyncio.Event()
        # Until when our claims hold, as we count it (time.monotonic()): a heartbeat short
        # of the earliest moment another member may take them over (see _write).
        self._lease = Deadline(0.0)
        self._stopping = False
        self._closed = False
        self._registered = False

    # -- called by the connection ----------------------------------------------------

    def on_reconnected(self) -> None:
        # Deliveries in flight when the connection broke are lost, and JetStream counts
        # them as delivered: re-take every partition at its ack floor.
        for feed in self._feeds.values():
            feed.break_off()
        self._wake.set()

    def on_replaced(self) -> None:
        # A new client: our key-value handle and coordination subscription were on the
        # old one, and every delivery in flight died with it.
        self._attached = None
        self.on_reconnected()

    def abort(self) -> None:
        """Cancel every task this member owns, without any network step (the transport
        is closing under a member whose close was cut short)."""
        self._closed = self._stopping = True
        for task in self._tasks():
            task.cancel()

    async def aborted(self, deadline: Deadline) -> None:
        tasks = [task for task in self._tasks() if not task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=deadline.remaining())

    def _tasks(self) -> list[asyncio.Task[None]]:
        tasks = [self._coordinator, self._acker, *(feed.task for feed in self._feeds.values())]
        return [task for task in tasks if task is not None]

    # -- Consumer --------------------------------------------------------------------

    async def start(self) -> None:
        conn = self._conn
        try:
            self._stream = await conn.stream(self._topic)
            await self._attach()
        except NATS_ERRORS as exc:
            raise translate(exc, "subscribe", self._topic, group=self._group) from exc
        conn.register(self)
        self._registered = True
        loop = asyncio.get_running_loop()
        self._acker = loop.create_task(
            self._supervised("acker", self._ack_loop), name=f"keybus-nats-ack:{self._topic}"
        )
        self._coordinator = loop.create_task(
            self._supervised("coordinator", self._coordinate),
            name=f"keybus-nats-group:{self._topic}",
        )
        if not await wait_event(self._settled, self._options.lease_ttl + _SETTLE_SLACK):
            log.warning("keybus: %s/%s: partitions not all assigned yet", self._topic, self._group)

    async def _attach(self) -> None:
        """Open the group-state bucket and the coordination subscription on the current
        client (again, after the client was replaced)."""
        nc, js = self._conn.live()
        if self._attached is nc:
            return
        self._kv = await open_bucket(js)
        old, self._ping_sub = self._ping_sub, None
        if old is not None:
            await unsubscribe(old)
        self._ping_sub = await nc.subscribe(self._ping, cb=self._on_ping)
        self._attached = nc

    def lapsed(self, partitions: Collection[Partition]) -> None:
        # The core gave these up: their ownership deadline passed before it could start
        # their next message (our process stalled, say). Stop pulling them; the next
        # round (at once) re-takes them from the ack floor if they are still ours to have.
        for _, partition in partitions:
            feed = self._feeds.get(partition)
            if feed is not None:
                feed.break_off()
        self._wake.set()

    def commit(self, message: Message) -> None:
        # The hot path (once per done message): the feed's fields are updated here, with
        # no call into it.
        feed = self._feeds.get(message.partition)
        seq = message.offset
        if feed is None or feed.lost or seq <= feed.committed:
            return  # not ours any more: the next owner redoes it (at-least-once)
        feed.committed = seq
        feed.commit_reply = message.raw.reply
        delivered = feed.delivered
        while delivered and delivered[0][1][-1].offset <= seq:
            delivered.popleft()
        if not self._ack_wake.is_set():
            self._ack_wake.set()

    async def flush(self, deadline: Deadline) -> None:
        budget = min(deadline.share(_FLUSH_SHARE).remaining(), self._options.api_timeout)
        await self._sync_acks(list(self._feeds.values()), budget)

    async def stop(self, deadline: Deadline) -> None:
        # Local steps only (cancelling and unsubscribing): nothing here waits on the server.
        self._stopping = True
        for feed in list(self._feeds.values()):
            await feed.stop()

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
            for feed in list(self._feeds.values()):
                await feed.stop()
            if self._kv is not None:
                leave = min(deadline.share(_LEAVE_SHARE).remaining(), self._options.api_timeout)
                try:
                    async with asyncio.timeout(leave):
                        await self._leave()
                except Exception as exc:
                    log.warning("keybus: leaving group %s cleanly failed: %r", self._group, exc)
        finally:
            for feed in list(self._feeds.values()):  # if leaving failed
                feed.lost = True
                await feed.stop_now()
            self._feeds.clear()
            sub, self._ping_sub = self._ping_sub, None
            if sub is not None:
                await unsubscribe(sub)
            if self._registered:
                self._registered = False
                self._conn.unregister(self)

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
                if self._feeds and self._lease.expired:
                    # Could not renew in time: another member may take these any moment.
                    log.warning(
                        "keybus: %s/%s: lease not renewed, revoking", self._topic, self._group
                    )
                    await self._release(list(self._feeds), lost=True)
                await self._round(leaving=False)
            except asyncio.CancelledError:
                raise
            except _ROUND_ERRORS as exc:
                log.debug("keybus: %s/%s rebalance round failed: %r", self._topic, self._group, exc)
            except Exception:
                log.exception("keybus: %s/%s rebalance round failed", self._topic, self._group)
            wait = heartbeat
            if self._feeds:
                wait = max(0.05, min(wait, self._lease.remaining()))
            await wait_event(self._wake, wait)

    def _step_budget(self) -> float:
        """Seconds one network step of a round may take: at most ``api_timeout``, and
        while we own partitions never past the moment we must give them up."""
        if self._feeds:
            return self._lease.within(self._options.api_timeout).remaining()
        return self._options.api_timeout

    async def _write(self, change: Callable[[GroupState], T]) -> Written[T]:
        """Compare-and-set ``change`` into the group state, and count our lease from it:
        no other member sees the renewal it wrote before it was sent, so none takes our
        claims over before ``lease_ttl`` after that; we stop a heartbeat earlier."""
        assert self._kv is not None
        written = await compare_and_set(self._kv, self._key, change, self._sightings)
        options = self._options
        self._lease = Deadline(written.sent + options.lease_ttl - options.heartbeat)
        return written

    def _next_renewal(self) -> float:
        """A new renewal token (every write of ours changes it: that is the renewal)."""
        self._renewal = next_renewal(self._renewal, self._options.lease_ttl)
        return self._renewal

    def _renewed(self, partitions: Iterable[int]) -> None:
        """Tell the core that these partitions are ours until our lease's end."""
        owned = [(self._topic, p) for p in partitions if p in self._feeds]
        if owned:
            self._sink.renew(owned, self._lease.at)

    async def _leave(self) -> None:
        state = await self._round(leaving=True)
        if state.members or not self._group.startswith(ANONYMOUS_GROUP_PREFIX):
            return
        if self._stream is None:
            return
        # The last member of an anonymous group (a bus without group=) is gone and nobody
        # can ever name that group again: drop its durables instead of leaving them behind.
        _, js = self._conn.live()
        for name in self._created:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(self._stream.name, name)
        assert self._kv is not None
        await self._kv.purge(self._key)

    async def _round(self, *, leaving: bool) -> GroupState:
        """One rebalance step: give up what is no longer ours, renew, take what is free."""
        me = self._id
        await self._attach()
        assert self._kv is not None
        assert self._stream is not None
        kv, partitions = self._kv, self._stream.partitions
        broken = [p for p, feed in self._feeds.items() if feed.broken]
        if broken:
            # Re-take: give them up here (done prefix acked); the write below drops our
            # claim and, if they are still ours to have, claims them again in the same
            # compare-and-set, and _take starts a fresh consumer at the ack floor.
            await self._release(broken, lost=False)
        async with asyncio.timeout(self._step_budget()):
            state, _ = await read(kv, self._key, self._sightings)
        was_member = me in state.members
        if leaving:
            state.leave(me)
        else:
            state.join(me, self._renewal)  # (only to see what is desired)
        desired = state.desired(partitions)
        lost = state.not_ours(me, self._feeds)
        if lost:
            await self._release(lost, lost=True)
        release = [
            p for p in self._feeds if leaving or (not self._stopping and desired.get(p) != me)
        ]
        if release:
            await self._release(release, lost=False)
        taking = not leaving and not self._stopping

        def change(state: GroupState) -> RoundClaims:
            return state.write_round(
                me,
                renewal=self._next_renewal(),
                held=self._feeds.keys(),
                partitions=partitions,
                leaving=leaving,
                taking=taking,
            )

        async with asyncio.timeout(self._step_budget()):
            written = await self._write(change)
        state, claims = written.state, written.outcome
        if claims.stolen:
            # Another member's now, or our claim was dropped (we were silent for a lease):
            # give them up at once; the next round takes back what is free and ours.
            await self._release(claims.stolen, lost=True)
            self._wake.set()
        self._renewed(p for p in self._feeds if p not in claims.stolen)
        for p in claims.taken:
            async with asyncio.timeout(self._step_budget()):
                await self._take(p, fence=written.revision)
        desired = state.desired(partitions)
        if all(p in self._feeds for p, m in desired.items() if m == me):
            self._settled.set()
        if release or claims.taken or claims.stolen or broken or leaving or not was_member:
            nc, _ = self._conn.live()
            await nc.publish(self._ping, me.encode())
        return state

    async def _release(self, partitions: Iterable[int], *, lost: bool) -> None:
        feeds = [self._feeds[p] for p in partitions if p in self._feeds]
        for feed in feeds:
            feed.lost = feed.lost or lost
            await feed.stop()
        keeper = asyncio.get_running_loop().create_task(
            self._keep_leases(), name=f"keybus-nats-lease:{self._topic}"
        )
        try:
            # The core drops their queued messages, waits for their running handlers and
            # reports the done prefix (commit) before this returns. Never past our lease:
            # after it, another member may already run these partitions' keys.
            deadline = Deadline.passed() if lost else self._lease.within(self._sink.revoke_timeout)
            await self._sink.revoke([(self._topic, feed.partition) for feed in feeds], deadline)
        finally:
            await cancel_and_wait(keeper)
        # Bounded by the lease too: the keeper has stopped, and the partitions we keep must
        # be revoked (by the coordinator, once this returns) before anyone may take them.
        await self._sync_acks(feeds, self._step_budget())
        for feed in feeds:
            if self._feeds.get(feed.partition) is feed:
                del self._feeds[feed.partition]

    async def _keep_leases(self) -> None:
        """Renew our leases while a revoke waits for handlers (the loop is busy)."""
        me = self._id
        claimed: list[int] = []

        def renew(state: GroupState) -> None:
            nonlocal claimed
            claimed = state.renew(me, self._next_renewal())

        while True:
            await asyncio.sleep(self._options.heartbeat)
            try:
                async with asyncio.timeout(self._step_budget()):
                    await self._write(renew)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("keybus: %s: renewing leases failed: %r", self._topic, exc)
            else:
                self._renewed(claimed)
            if self._lease.expired:
                # Not renewed in time: others may take every partition we hold any moment.
                # Stop fetching and acking, and cancel their running handlers now (the
                # revoke in progress waits for its handlers until its own deadline; the
                # other partitions' handlers would run on meanwhile). The revoke in
                # progress then ends at once; the coordinator finishes the job.
                feeds = list(self._feeds.values())
                for feed in feeds:
                    feed.lost = True
                    if feed.task is not None:
                        feed.task.cancel()
                await self._sink.revoke(
                    [(self._topic, feed.partition) for feed in feeds], Deadline.passed()
                )
                return

    # -- partitions ------------------------------------------------------------------

    async def _take(self, partition: int, *, fence: int) -> None:
        stream = self._stream
        assert stream is not None
        nc, js = self._conn.live()
        options = self._options
        prefix = f"{consumer_name(self._group, partition)}_"
        previous = [c for c in await js.consumers_info(stream.name) if c.name.startswith(prefix)]
        # Consumers only ever start at their predecessor's floor, so the highest floor is
        # the group's committed position (leftovers of a crash mid-take have lower ones).
        floor = max((c.ack_floor.stream_seq for c in previous if c.ack_floor), default=0)
        name = f"{prefix}{uuid.uuid4().hex[:8]}"
        # Noted before the create: a cancellation while waiting for its reply may leave it
        # on the server, and the last member of an anonymous group deletes what it noted.
        self._created.add(name)
        await js.add_consumer(
            stream.name,
            api.ConsumerConfig(
                name=name,
                durable_name=name,
                filter_subject=stream.subjects[partition],
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
                await js.delete_consumer(stream.name, old.name)
        # (A late commit of an old epoch is at most the floor: ignored.)
        feed = PartitionFeed(
            self._topic,
            partition,
            stream,
            name,
            floor,
            fence,
            options,
            self._sink.deliver,
            self._wake,
        )
        # Registered before the subscription exists, so a cancellation cannot leak it.
        self._feeds[partition] = feed
        try:
            await feed.subscribe(nc)
        except BaseException:
            del self._feeds[partition]
            raise
        # Ours until the lease the claiming write gave us; renewed with every renewal.
        self._sink.assign([(self._topic, partition)], valid_until=self._lease.at)
        feed.start(nc)

    # -- acks ------------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        """Asynchronous acks of done prefixes, and the in-progress acks every
        ``ack_wait / 3`` (here, not in the coordinator: a slow KV round must not delay
        them into a redelivery)."""
        interval = self._options.ack_wait / 3
        keep_alive_at = time.monotonic() + interval
        while not self._closed:  # see _supervised
            left = keep_alive_at - time.monotonic()
            if left > 0 and not self._ack_wake.is_set():
                await wait_event(self._ack_wake, left)
            try:
                nc, _ = self._conn.live()  # (a new client after a replacement)
            except KeybusError:
                await asyncio.sleep(self._options.heartbeat)  # being replaced, or gone
                continue
            if time.monotonic() >= keep_alive_at:
                keep_alive_at = time.monotonic() + interval
                await self._keep_alive(nc, interval)
            if not self._ack_wake.is_set():
                continue
            self._ack_wake.clear()
            for feed in list(self._feeds.values()):
                await feed.ack(nc)
            # Coalesce: at most one ack per partition per interval, however many commits
            # arrive meanwhile (flush and hand-overs ack synchronously, not through here).
            await asyncio.sleep(_ACK_INTERVAL)

    async def _sync_acks(self, feeds: Iterable[PartitionFeed], budget: float) -> None:
        """Ack each feed's done prefix and wait for the server to confirm, all at once,
        within ``budget`` seconds."""
        todo = [feed for feed in feeds if feed.unsynced]
        if not todo:
            return
        try:
            nc, _ = self._conn.live()
        except KeybusError as exc:
            # No connection (being replaced, or gone): the next owner starts at the floor
            # the server has, and handles the unacknowledged rest again (at-least-once).
            log.warning("keybus: %s: acks not sent: %s", self._topic, exc)
            return
        await asyncio.gather(*(feed.sync_ack(nc, budget) for feed in todo))

    async def _keep_alive(self, nc: NatsClient, interval: float) -> None:
        """In-progress acks for delivered, uncommitted messages: a long handler keeps its
        message instead of JetStream redelivering it after ``ack_wait``. Chunks that
        arrived less than half an interval ago are skipped (the next round reaches them
        well within ``ack_wait``), so a busy partition sends few."""
        young = time.monotonic() - interval / 2
        for feed in list(self._feeds.values()):
            await feed.keep_alive(nc, young)
