"""Conformance: handlers and inputs that misbehave must never wedge a subscription."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

import keybus
from keybus.engine import SubscriptionEngine
from keybus.testing.conformance.backend import Backend
from keybus.testing.conformance.fixtures import BackendFixtures, BusFactory
from keybus.testing.conformance.helpers import Collected, eventually, watch_dead_letters

__all__ = ["RobustnessSuite"]


class RobustnessSuite(BackendFixtures):
    async def test_handler_raising_cancelled_error_is_a_failure_not_a_stall(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        letters = await watch_dead_letters(open_bus, topic)
        seen: list[bytes] = []

        async def handler(message: keybus.Message) -> None:
            seen.append(message.value)
            if message.value == b"boom":
                # e.g. it awaited a future that someone else cancelled
                raise asyncio.CancelledError

        await bus.subscribe(topic, handler, max_attempts=2, retry_backoff=0.001)
        await bus.publish(topic, b"boom", key="k")
        await bus.publish(topic, b"next", key="k")
        await eventually(lambda: b"next" in seen and len(letters) == 1, what="next + dead letter")
        assert seen == [b"boom", b"boom", b"next"], "retried in place, then the key moved on"
        assert letters[0].headers["X-Error"].startswith(b"CancelledError")

    async def test_deeply_nested_poison_is_dead_lettered_and_the_stream_continues(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        letters = await watch_dead_letters(open_bus, topic)
        handled = Collected()
        await bus.subscribe_envelope(topic, handled)
        poison = b'{"payload":' + b"[" * 5000 + b"]" * 5000 + b"}"
        await bus.publish(topic, poison, key="agg")
        await bus.publish_envelope(
            topic, keybus.Envelope(aggregate_id="agg", event_type="E", event_version=1, payload={})
        )
        await eventually(lambda: len(handled) == 1 and len(letters) == 1, what="handled + DLQ")
        assert letters[0].headers["X-Error"].startswith(b"EnvelopeError: envelope:")

    async def test_close_called_from_inside_a_handler_completes_and_loses_nothing(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        """The close completes on every backend; that nothing is lost is checked where a
        successor resumes the group (``restart_resumes``)."""
        topic = backend.topic()
        publisher = await open_bus()
        await publisher.ensure_topic(topic)
        bus = await open_bus(group="self-closing")
        entered = asyncio.Event()

        async def shut_down_on_fatal(message: keybus.Message) -> None:
            entered.set()
            await bus.close(timeout=0.3)  # cancels this very handler; close goes on

        await bus.subscribe(topic, shut_down_on_fatal)
        await publisher.publish(topic, b"fatal", key="k")
        await asyncio.wait_for(entered.wait(), 30)
        await asyncio.wait_for(bus.close(), 15)  # the same close, awaited from outside
        assert bus.closed
        if not backend.features.restart_resumes:
            return
        successor = await open_bus(group="self-closing")
        got = Collected()
        await successor.subscribe(topic, got)
        # The handler never finished, so its message was not committed: it comes back.
        await eventually(
            lambda: b"fatal" in got.values(),
            timeout=backend.features.handover_timeout,
            what="redelivery to the successor",
        )

    async def test_a_crash_inside_the_core_intake_is_reported_by_name_at_once(
        self,
        open_bus: BusFactory,
        backend: Backend,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Only a keybus bug can make ``SubscriptionEngine.deliver`` raise. Whatever task
        called it must not die without a word: it is logged by name at once. A backend
        with ``retakes_crashed_partition`` then re-takes the partition and delivers the
        message; others leave the subscription stalled until reopened."""
        original = SubscriptionEngine.deliver
        crashes: list[int] = []

        async def deliver(engine: SubscriptionEngine, messages: Sequence[keybus.Message]) -> None:
            if not crashes:
                crashes.append(len(messages))
                raise RuntimeError("a bug in the core")
            await original(engine, messages)

        monkeypatch.setattr(SubscriptionEngine, "deliver", deliver)
        bus = await open_bus()
        topic = backend.topic("intake")
        got = Collected()
        await bus.subscribe(topic, got)
        await bus.publish(topic, b"1", key="k")

        def reported() -> bool:
            return any(
                r.levelno == logging.ERROR
                and "crashed" in r.getMessage()
                and topic in r.getMessage()
                for r in caplog.records
            )

        await eventually(reported, what="an error log naming the crashed task")
        assert crashes == [1]
        if backend.features.retakes_crashed_partition:
            await eventually(
                lambda: got.values() == [b"1"],
                timeout=backend.features.handover_timeout,
                what="the re-taken partition",
            )
        # open_bus closes the bus and checks for leaks: the dead task is not left behind.
