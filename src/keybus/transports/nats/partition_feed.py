"""One partition a member owns, for one ownership epoch (one durable pull consumer):
pulling, converting deliveries into messages (each stamped with the epoch's fence: the
revision of the group-state write that claimed the partition), the consumer-sequence gap
check, acks and in-progress acks.

The gap check: every delivery — redeliveries too — takes the next consumer sequence (the
``<cseq>`` of ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>...``). One skipped
means deliveries were lost on the wire, which JetStream counts as delivered: pulling on
would hand out newer messages first, and an ack-all of them would acknowledge the lost
ones unprocessed. So a gap (like a reconnect, a crashed pull task or a consumer deleted
under us) *breaks* the feed: it stops pulling, hands nothing from the gap on to the core,
and the group member re-takes the partition afresh at its ack floor.

The commit side (``GroupMember.commit``, one call per done message) updates ``committed``,
``commit_reply`` and ``delivered`` here directly: the hot path takes no extra call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import api

from keybus._aio import cancel_and_wait, wait_event
from keybus.message import Message
from keybus.transports.nats.client import Stream
from keybus.transports.nats.errors import NATS_ERRORS
from keybus.transports.nats.headers import NatsHeaders, decode_key
from keybus.transports.nats.options import NatsOptions

__all__ = ["PartitionFeed", "unsubscribe"]

log = logging.getLogger("keybus.nats")

_ACK = b"+ACK"
_IN_PROGRESS = b"+WPI"
_CONSUMER_DELETED = "Consumer Deleted"  # the description of a 409 status


class PartitionFeed:
    """Pulls one partition's durable consumer into the core's ``deliver``."""

    def __init__(
        self,
        topic: str,
        partition: int,
        stream: Stream,
        consumer: str,
        floor: int,
        fence: int,
        options: NatsOptions,
        deliver: Callable[[Sequence[Message]], Awaitable[None]],
        coordinator: asyncio.Event,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.consumer = consumer
        self.fence = fence  # this ownership's token, stamped into every message
        self._stream = stream
        self._options = options
        self._deliver = deliver
        self._coordinator = coordinator  # set: the member's coordinator re-takes us
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
        self.committed = floor  # stream sequence ending the done prefix
        self.commit_reply = ""
        self.acked = floor  # sent (asynchronously)
        self.synced = floor  # confirmed by the server
        self.lost = False  # ownership lost without a clean hand-over: never ack again

    # -- lifecycle -----------------------------------------------------------------------

    async def subscribe(self, nc: NatsClient) -> None:
        """The inbox the pull requests are answered on."""
        self.sub = await nc.subscribe(nc.new_inbox(), cb=self._receiver())

    def start(self, nc: NatsClient) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._pull_supervised(nc), name=f"keybus-nats-pull:{self.topic}:{self.partition}"
        )

    def break_off(self) -> None:
        """Deliveries may have been lost (a reconnect): stop, to be re-taken."""
        self.broken = True
        self.wake.set()

    async def stop(self) -> None:
        await cancel_and_wait(self.task)
        await self.stop_now()

    async def stop_now(self) -> None:
        """Cancel the pull task (without waiting for it) and drop the subscription."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.task = None
        sub, self.sub = self.sub, None
        if sub is not None:
            await unsubscribe(sub)

    # -- pulling -------------------------------------------------------------------------

    def _receiver(self) -> Callable[[Msg], Any]:
        wake = self.wake

        async def on_message(msg: Msg) -> None:
            if msg.reply:  # the hot path: a message (activity is noted when pulled)
                self.buffer.append(msg)  # (swapped by the pull loop: looked up each time)
                self.requested -= 1
                wake.set()
                return
            # a status: 100 heartbeat, 408 request expired, 409 ...
            self.activity = time.monotonic()
            status = (msg.headers or {}).get("Status", "")
            if status == "100":
                return
            left = (msg.headers or {}).get("Nats-Pending-Messages")
            if status == "408" and left and left.isdigit():
                self.requested = max(0, self.requested - int(left))
            else:
                self.requested = 0
                description = (msg.headers or {}).get(api.Header.DESCRIPTION, "")
                if status == "503" or (status == "409" and description == _CONSUMER_DELETED):
                    # Our consumer is gone (topic deleted, or taken over): asking again
                    # would only bring another 503 at once, forever. Re-take instead.
                    self.broken = True
            wake.set()

        return on_message

    async def _pull_supervised(self, nc: NatsClient) -> None:
        try:
            await self._pull(nc)
        except asyncio.CancelledError:
            raise
        except Exception:
            # What reached the core is unknown: re-take from the ack floor.
            log.exception(
                "keybus: %s/%d: pulling crashed; re-taking the partition",
                self.topic,
                self.partition,
            )
            self.broken = True
            self._coordinator.set()

    async def _pull(self, nc: NatsClient) -> None:
        options = self._options
        batch = options.fetch_batch
        request_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self._stream.name}.{self.consumer}"
        request = json.dumps(
            {
                "batch": batch,
                "expires": int(options.fetch_expires * 1e9),
                "idle_heartbeat": int(options.idle_heartbeat * 1e9),
            }
        ).encode()
        assert self.sub is not None
        inbox = self.sub.subject
        silent_after = options.idle_heartbeat * 2.5
        convert = self.convert
        deliver = self._deliver
        while True:
            if self.broken:
                self._coordinator.set()  # the coordinator re-takes the partition
                return
            if self.buffer:
                received, self.buffer = self.buffer, []
                self.activity = now = time.monotonic()
                messages = []
                for msg in received:
                    message = convert(msg)
                    if self.broken:
                        break  # a gap: nothing from here on may reach the core
                    if message is not None:
                        messages.append(message)
                if messages:
                    self.delivered.append((now, messages))
                    await deliver(messages)
                continue
            if self.requested < 0:
                self.requested = 0
            if time.monotonic() - self.activity > silent_after:
                self.requested = 0  # no heartbeat: the server lost our request
            if self.requested <= batch // 2:
                # Keep a second request queued so delivery never waits for a round trip.
                with contextlib.suppress(*NATS_ERRORS):
                    await nc.publish(request_subject, request, reply=inbox)
                    self.requested += batch
                    self.activity = time.monotonic()
            self.wake.clear()
            if self.buffer:
                continue
            await wait_event(self.wake, options.idle_heartbeat)

    def convert(self, msg: Msg) -> Message | None:
        """The message a delivery carries; ``None`` for one the core has already (a
        redelivery) or for a gap (then the feed is broken)."""
        tokens = msg.reply.split(".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the v2
        # form with domain and account hash after "$JS.ACK".
        shift = 0 if len(tokens) == 9 else 2
        cseq = int(tokens[6 + shift])
        if cseq != self.last_cseq + 1:
            if cseq <= self.last_cseq:
                return None  # a delivery we already had (cannot happen; never twice)
            log.warning(
                "keybus: %s/%d: deliveries %d..%d were lost; re-taking the partition",
                self.topic,
                self.partition,
                self.last_cseq + 1,
                cseq - 1,
            )
            self.broken = True
            return None
        self.last_cseq = cseq
        seq = int(tokens[5 + shift])
        if seq <= self.last_seq:
            # Redelivered after ack_wait: with no delivery lost in this epoch (checked
            # above), its first delivery is with the core.
            return None
        self.last_seq = seq
        stamp = int(tokens[7 + shift]) / 1e9
        key, headers = decode_key(msg), NatsHeaders(msg)
        return Message(
            self.topic, msg.data, key, headers, self.partition, seq, stamp, msg, self.fence
        )

    # -- acks ----------------------------------------------------------------------------

    async def ack(self, nc: NatsClient) -> None:
        """Send the done prefix's ack if it moved (asynchronous: no reply awaited)."""
        if self.committed > self.acked and not self.lost:
            self.acked = self.committed
            # AckPolicy.ALL: acking the end of the done prefix acks all before it.
            with contextlib.suppress(*NATS_ERRORS):
                await nc.publish(self.commit_reply, _ACK)

    @property
    def unsynced(self) -> bool:
        """A done prefix the server has not confirmed yet (and may still be acked)."""
        return self.committed > self.synced and not self.lost

    async def sync_ack(self, nc: NatsClient, timeout: float) -> None:
        """Ack the done prefix and wait (up to ``timeout`` s) for the server to confirm."""
        seq = self.committed
        try:
            await nc.request(self.commit_reply, _ACK, timeout=timeout)
        except nats.errors.NoRespondersError:
            # The consumer is gone (topic deleted, or taken over): nothing to ack.
            log.debug("keybus: ack of %s/%d: no consumer", self.topic, seq)
        except NATS_ERRORS as exc:
            log.warning("keybus: ack of %s/%d failed: %r", self.topic, seq, exc)
        else:
            self.synced = self.acked = max(self.acked, seq)

    async def keep_alive(self, nc: NatsClient, young: float) -> None:
        """In-progress acks for delivered, uncommitted messages that arrived before
        ``young`` (``time.monotonic()``), and for those waiting for room in the core."""
        if self.lost or self.broken:
            return
        publish = nc.publish
        committed = self.committed
        for arrived, chunk in list(self.delivered):
            if arrived > young:
                break
            for message in chunk:
                if message.offset > committed:
                    with contextlib.suppress(*NATS_ERRORS):
                        await publish(message.raw.reply, _IN_PROGRESS)
        for msg in list(self.buffer):  # received, waiting for room in the core
            with contextlib.suppress(*NATS_ERRORS):
                await publish(msg.reply, _IN_PROGRESS)


async def unsubscribe(sub: NatsSubscription) -> None:
    # nats-py removes the interest locally (and stops the subscription's task) before
    # its first await, which only queues an UNSUB: a cancellation cannot leave it behind.
    with contextlib.suppress(*NATS_ERRORS):
        await sub.unsubscribe()
