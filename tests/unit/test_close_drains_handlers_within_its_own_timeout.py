"""``close(timeout)`` lets in-flight handlers finish — publishing included — and returns
within its own timeout plus a small constant, whatever else is draining."""

from __future__ import annotations

import asyncio

import keybus
from keybus.testing import LeakChecker
from tests.helpers import Collected, eventually


async def test_a_handler_publishing_while_its_bus_drains_is_not_dead_lettered(
    no_leaks: LeakChecker,
) -> None:
    """close() lets in-flight handlers finish: one that publishes (a follow-up event) must
    be able to. Before, its publish raised BusClosedError, the handler was retried and
    the message dead-lettered and committed — a good message lost to a graceful close."""
    entered, go = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []
    async with (
        keybus.connect("memory://drain-publish") as watcher,
        keybus.connect("memory://drain-publish", group="g") as bus,
    ):
        letters = Collected()
        await watcher.subscribe("t.dlq", letters)
        follow_ups = Collected()
        await watcher.subscribe("follow-ups", follow_ups)

        async def handler(m: keybus.Message) -> None:
            entered.set()
            await go.wait()
            await bus.publish("follow-ups", b"after " + m.value)
            await bus.publish("t", b"again")  # its own topic
            outcome.append("published")

        await bus.subscribe("t", handler, retry_backoff=0.01)
        await bus.publish("t", b"work", key="k")
        await asyncio.wait_for(entered.wait(), 10)
        closing = asyncio.create_task(bus.close(timeout=5))
        await eventually(lambda: bus.closed, what="close started")
        go.set()
        await asyncio.wait_for(closing, 10)
        assert outcome == ["published"]
        await eventually(lambda: follow_ups.values() == [b"after work"], what="follow-up")
        assert letters == []


async def _stuck_subscription(bus: keybus.EventBus) -> keybus.Subscription:
    entered = asyncio.Event()

    async def stuck(m: keybus.Message) -> None:
        entered.set()
        await asyncio.Event().wait()

    sub = await bus.subscribe("t", stuck)
    await bus.publish("t", b"x", key="k")
    await asyncio.wait_for(entered.wait(), 10)
    return sub


async def test_close_is_bounded_by_its_own_timeout_while_an_unsubscribe_drains(
    no_leaks: LeakChecker,
) -> None:
    """close(timeout) returns within its timeout plus a small constant, even when an
    unsubscribe with a longer timeout is already draining the subscription: before, the
    close waited for the unsubscribe's own deadline."""
    async with keybus.connect("memory://close-vs-unsub", group="g") as bus:
        sub = await _stuck_subscription(bus)
        unsubscribing = asyncio.create_task(sub.unsubscribe(timeout=60))
        await eventually(lambda: sub.closed, what="unsubscribe started")
        await asyncio.wait_for(bus.close(timeout=0.1), 4)
        await asyncio.wait_for(unsubscribing, 1)


async def test_a_second_close_with_a_shorter_timeout_is_bounded_by_it(
    no_leaks: LeakChecker,
) -> None:
    async with keybus.connect("memory://close-twice", group="g") as bus:
        await _stuck_subscription(bus)
        first = asyncio.create_task(bus.close(timeout=60))
        await eventually(lambda: bus.closed, what="first close started")
        await asyncio.wait_for(bus.close(timeout=0.1), 4)
        await asyncio.wait_for(first, 1)
