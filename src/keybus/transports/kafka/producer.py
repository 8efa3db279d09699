"""The Kafka transport's producer: librdkafka served from the event loop, no thread.

``produce()`` is non-blocking, and ``poll(0)`` serves delivery reports without waiting,
so both run on the event-loop thread. A *pump* task calls ``poll(0)`` while deliveries
are outstanding (every loop turn while reports keep coming, every 1 ms — 10 ms after a
quiet second — while it waits for acks) and parks when none are, so an idle bus costs
nothing. The delivery callback runs inside that ``poll`` on the loop thread and resolves
the publish's future directly: no ``call_soon_threadsafe``, no batch list, and above all
no second Python thread competing for the GIL. (confluent-kafka takes the GIL once per
delivery report on the polling thread; a polling thread has to win it from the busy loop
thread for every ack. See docs/kafka.md for the figures.)

``close(deadline)`` stops the pump, keeps polling (on the loop) until every publish got
its report, purges what is left (those publishes fail with ``PublishError``), then
destroys the handle on a short-lived thread that it joins — ``rd_kafka_destroy`` joins
librdkafka's native threads and must not block the loop. Each of the three steps gets
its share of the close's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from confluent_kafka import KafkaException
from confluent_kafka import Producer as _RdProducer

from keybus._aio import cancel_and_wait
from keybus.deadline import Deadline
from keybus.errors import KeybusError, PublishError
from keybus.transports.kafka.config import STEP_MARGIN
from keybus.transports.kafka.errors import closed, translate
from keybus.transports.kafka.threads import OwnedThread, set_done

__all__ = ["KafkaProducer"]

log = logging.getLogger("keybus.kafka")

_BUSY_POLL = 0.001  # pump period while acks are awaited
_SLOW_POLL = 0.01  # ... once nothing came back for _QUIET_TURNS periods (broker away)
_QUIET_TURNS = 1000
_IDLE_POLL = 1.0  # parked pump still serves librdkafka's log lines this often
# A publish waits this long for room in librdkafka's full queue: as long as it would
# wait for its ack (our message.timeout.ms). A publish has no deadline of its own.
_QUEUE_FULL_WAIT = 30.0
# close(deadline): of the time left, publishes in flight get the first _FLUSH_SHARE for
# their ack (an acknowledging broker answers in milliseconds, an absent one never); of
# what is left then, the purged ones get _PURGE_SHARE for their (local, immediate)
# failure reports; the destroy, which must not be cut short or librdkafka's threads
# outlive close(), gets the rest. With the 5 s minimum close budget that is ~1.4 s,
# ~1 s and ~2.3 s (the Kafka transport gives it at most that budget: the rest of its own
# is for the consumers).
_FLUSH_SHARE = 0.3
_PURGE_SHARE = 0.3


_Future = asyncio.Future
_T = TypeVar("_T")


def _delivered(future: asyncio.Future[None], err: Any, msg: Any) -> None:
    # Runs on the loop thread, inside KafkaProducer's poll(0).
    if future.done():  # the publish was cancelled
        return
    if err is None:
        future.set_result(None)
        return
    future.set_exception(translate(err, "publish", msg.topic() if msg is not None else ""))


class _Batch:
    """One ``send_many``: a report per record lands here (on the loop, inside poll), and
    one future resolves when the last one did — instead of a future per record and a
    gather over them (about 2 µs a record less)."""

    __slots__ = ("errors", "future", "left", "topic")

    def __init__(self, loop: asyncio.AbstractEventLoop, topic: str, size: int) -> None:
        self.future: asyncio.Future[None] = loop.create_future()
        self.errors: list[KeybusError | None] = [None] * size
        self.left = size
        self.topic = topic

    def report(self, index: int, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors[index] = translate(err, "publish", self.topic)
        self.done_one()

    def fail(self, index: int, error: KeybusError) -> None:
        self.errors[index] = error
        self.done_one()

    def done_one(self) -> None:
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(None)


def _poll(rd: _RdProducer) -> int:
    try:
        served: int = rd.poll(0)
    except Exception:  # a callback raised; the rest of the queue is served next time
        log.exception("keybus: a Kafka producer callback failed")
        return 1
    return served


async def _serve_reports(rd: _RdProducer, deadline: Deadline) -> None:
    """Poll (on the loop) until every record handed to ``rd`` got its report, or until
    ``deadline``."""
    while len(rd) and not deadline.expired:
        if not _poll(rd):
            await asyncio.sleep(_BUSY_POLL)


class KafkaProducer:
    """The idempotent producer of one bus, served by a pump task on the event loop."""

    def __init__(
        self, config: Mapping[str, Any], loop: asyncio.AbstractEventLoop, url: str
    ) -> None:
        self._loop = loop
        self._url = url
        self._rd: _RdProducer | None = _RdProducer(dict(config))
        self._wake: asyncio.Future[None] | None = None
        self._pump_task: asyncio.Task[None] | None = loop.create_task(
            self._pump(), name="keybus-kafka-producer-pump"
        )

    def send(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> asyncio.Future[None]:
        """Hand one record to librdkafka; the returned future resolves with its delivery
        report. A plain call, not a coroutine: the transport's ``publish`` awaits the
        future itself, which saves a coroutine frame per publish. Raises ``BufferError``
        when librdkafka's queue is full (then use :meth:`send_when_room`)."""
        rd = self._rd
        if rd is None:
            raise closed(self._url)
        # asyncio.Future(loop=...) is what BaseEventLoop.create_future returns, minus a
        # Python-level call per publish.
        future: asyncio.Future[None] = _Future(loop=self._loop)
        # confluent-kafka takes a dict of headers as it is: no list to build.
        try:
            rd.produce(
                topic,
                value,
                key,
                headers=(headers if type(headers) is dict else dict(headers)) if headers else None,
                on_delivery=functools.partial(_delivered, future),
            )
        except (KafkaException, TypeError, ValueError) as exc:  # MSG_SIZE_TOO_LARGE: permanent
            raise translate(exc, "publish", topic) from exc
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        return future

    async def send_many(
        self, topic: str, records: Sequence[tuple[bytes, str | None, Mapping[str, bytes]]]
    ) -> list[PublishError | None]:
        """Hand every record to librdkafka in one loop (waiting for room when its queue
        is full), then wait for the batch's last report."""
        batch = _Batch(self._loop, topic, len(records))
        report = batch.report
        stuck: PublishError | None = None
        for index, (value, key, headers) in enumerate(records):
            if stuck is not None:
                # The queue stayed full: the rest fail too, or a later record of a key
                # could be sent ahead of an earlier one that was refused.
                batch.fail(index, stuck)
                continue
            produce = functools.partial(
                self._produce, topic, value, key, headers, functools.partial(report, index)
            )
            try:
                try:
                    produce()
                except BufferError:
                    await self._when_room(topic, produce)
            except PublishError as exc:  # (from _when_room: the queue stayed full)
                stuck = exc
                batch.fail(index, stuck)
            except (KafkaException, TypeError, ValueError) as exc:
                batch.fail(index, translate(exc, "publish", topic))
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        if records:
            await batch.future
        errors: list[PublishError | None] = []
        for error in batch.errors:
            if error is not None and not isinstance(error, PublishError):
                raise error  # closed meanwhile: not a verdict on the record
            errors.append(error)
        return errors

    async def send_when_room(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> asyncio.Future[None]:
        """:meth:`send`, once librdkafka's full local queue has room for the record."""
        return await self._when_room(
            topic, functools.partial(self.send, topic, value, key, headers)
        )

    async def _when_room(self, topic: str, attempt: Callable[[], _T]) -> _T:
        """librdkafka's local queue is full: flow control, not a failure. Serve delivery
        reports (that is what frees room) and run ``attempt`` (a produce) again until it
        is taken, for at most ``_QUEUE_FULL_WAIT``; then a ``PublishError``."""
        deadline = time.monotonic() + _QUEUE_FULL_WAIT
        while True:
            rd = self._rd
            if rd is None:
                raise closed(self._url)
            _poll(rd)
            await asyncio.sleep(_BUSY_POLL)
            try:
                return attempt()
            except BufferError:
                if time.monotonic() > deadline:
                    raise translate("local producer queue stayed full", "publish", topic) from None

    def _produce(
        self,
        topic: str,
        value: bytes,
        key: str | None,
        headers: Mapping[str, bytes],
        on_delivery: Callable[[Any, Any], None],
    ) -> None:
        """One record to librdkafka (``BufferError``: its queue is full)."""
        rd = self._rd
        if rd is None:
            raise closed(self._url)
        # confluent-kafka takes a dict of headers as it is: no list to build.
        rd.produce(
            topic,
            value,
            key,
            headers=(headers if type(headers) is dict else dict(headers)) if headers else None,
            on_delivery=on_delivery,
        )

    async def _pump(self) -> None:
        rd = self._rd
        assert rd is not None
        loop = self._loop
        quiet = 0
        try:
            while True:
                # _poll survives a raising callback (e.g. a user's error_cb/stats_cb from
                # producer_config): a dead pump would leave every publish waiting forever.
                if _poll(rd):
                    quiet = 0
                    await asyncio.sleep(0)  # one loop turn: the resolved publishers run
                elif len(rd):  # messages queued, in flight, or reports not yet served
                    quiet += 1
                    await asyncio.sleep(_BUSY_POLL if quiet < _QUIET_TURNS else _SLOW_POLL)
                else:
                    quiet = 0
                    wake = self._wake = loop.create_future()
                    timer = loop.call_later(_IDLE_POLL, set_done, wake)
                    try:
                        await wake
                    finally:
                        timer.cancel()
                        self._wake = None
        finally:
            del rd

    @property
    def pending(self) -> int:
        """Records queued or in flight, and reports not yet served."""
        rd = self._rd
        return len(rd) if rd is not None else 0

    async def close(self, deadline: Deadline) -> None:
        """Flush, purge and destroy the handle by ``deadline`` (idempotent)."""
        rd, self._rd = self._rd, None
        pump, self._pump_task = self._pump_task, None
        await cancel_and_wait(pump)
        if rd is None:
            return
        deadline = deadline.before(STEP_MARGIN)
        # Publishes in flight get their ack (or error) before the handle goes; what is
        # still unacknowledged after the flush's share is purged and fails.
        await _serve_reports(rd, deadline.share(_FLUSH_SHARE))
        with contextlib.suppress(Exception):
            rd.purge()
        await _serve_reports(rd, deadline.share(_PURGE_SHARE))
        # rd_kafka_destroy joins librdkafka's threads: off the loop, on a thread we join.
        holder = [rd]
        del rd

        def destroy() -> None:
            try:
                holder.pop().close()
            except Exception:  # pragma: no cover - nothing left to report it to
                log.exception("keybus: closing the Kafka producer failed")

        thread = OwnedThread(destroy, "keybus-kafka-producer-close", self._loop)
        thread.start()
        if not await thread.join(deadline):
            log.error("keybus: the Kafka producer was not destroyed in time")
