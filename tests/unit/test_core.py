"""Core pieces in isolation: done-tracking, keyed lanes, connect errors, options."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

import keybus
from keybus.dispatch import KeyedDispatcher
from keybus.message import Message
from keybus.positions import DoneTracker
from keybus.subscription import SubscribeOptions
from keybus.testing import LeakChecker, LeakError
from keybus.work import DONE, Work
from tests.helpers import eventually


def _work(offset: int, partition: int = 0) -> Work:
    return Work(Message("t", b"", None, {}, partition, offset), None, None)


def test_commit_point_advances_only_over_the_contiguous_done_prefix() -> None:
    commits: list[int] = []
    tracker = DoneTracker(lambda m: commits.append(m.offset))
    works = [_work(o) for o in (10, 11, 12, 15)]  # offsets may have gaps (compaction)
    for w in works:
        tracker.add(w)
    tracker.done(works[2])
    tracker.done(works[1])
    assert commits == [], "offset 10 is still open"
    tracker.done(works[0])
    assert commits == [12]
    tracker.done(works[3])
    assert commits == [12, 15]
    assert len(tracker) == 0


def test_partitions_are_tracked_independently_and_can_be_forgotten() -> None:
    commits: list[tuple[int, int]] = []
    tracker = DoneTracker(lambda m: commits.append((m.partition, m.offset)))
    a, b, c = _work(0, 0), _work(0, 1), _work(1, 1)
    for w in (a, b, c):
        tracker.add(w)
    tracker.done(b)
    assert commits == [(1, 0)]
    left = tracker.forget([("t", 0)])
    assert left == [a]
    tracker.done(a)  # finishing forgotten work commits nothing
    assert commits == [(1, 0)]
    assert a.state == DONE


async def test_dispatcher_keeps_key_order_and_runs_keys_concurrently() -> None:
    seen: dict[str, list[int]] = {}
    gate = asyncio.Event()

    async def process(work: Work) -> None:
        key, n = work.payload
        if key == "slow" and n == 0:
            await gate.wait()
        seen.setdefault(key, []).append(n)

    dispatcher = KeyedDispatcher(process, 4, "unit")
    for n in range(5):
        for key in ("slow", "a", "b"):
            dispatcher.submit(Work(Message("t", b""), (key, n), None), key)
    await eventually(lambda: seen.get("a") == list(range(5)) and seen.get("b") == list(range(5)))
    assert "slow" not in seen
    gate.set()
    await eventually(lambda: seen.get("slow") == list(range(5)))
    assert dispatcher.peak_concurrency >= 2
    assert await dispatcher.cancel(grace=1.0) == []


async def test_dispatcher_reaches_full_concurrency_when_handlers_wait() -> None:
    """Workers are woken one at a time (each wakes the next while lanes wait): with every
    handler blocked, all ``max_concurrency`` of them must still end up running."""
    gate = asyncio.Event()

    async def process(work: Work) -> None:
        await gate.wait()

    dispatcher = KeyedDispatcher(process, 16, "unit")
    for key in range(40):
        dispatcher.submit(Work(Message("t", b""), None, None), key)
    await eventually(lambda: dispatcher.running == 16)
    gate.set()
    assert await dispatcher.cancel(grace=1.0) == []


async def test_dispatcher_burst_of_quick_work_does_not_wake_a_worker_per_lane() -> None:
    done: list[int] = []

    async def process(work: Work) -> None:
        done.append(work.message.offset)  # finishes without suspending

    dispatcher = KeyedDispatcher(process, 256, "unit")
    for offset in range(500):
        dispatcher.submit(Work(Message("t", b"", None, {}, 0, offset), None, None), offset)
    await eventually(lambda: len(done) == 500)
    assert done == list(range(500))  # one worker took the lanes in order
    assert len(dispatcher._workers) <= 2, "a worker per ready lane was started"
    assert await dispatcher.cancel(grace=1.0) == []


async def test_dispatcher_cancel_ends_parked_and_busy_workers() -> None:
    async def process(work: Work) -> None:
        await asyncio.Event().wait()

    dispatcher = KeyedDispatcher(process, 8, "unit")
    async with LeakChecker(timeout=2):
        for key in "abc":
            dispatcher.submit(Work(Message("t", b""), None, None), key)
        await eventually(lambda: dispatcher.running == 3)
        assert await dispatcher.cancel(grace=1.0) == []


async def test_unknown_scheme_is_a_connect_error_naming_the_url() -> None:
    with pytest.raises(keybus.ConnectError, match="redis://x"):
        await keybus.connect("redis://x")
    with pytest.raises(keybus.ConnectError):
        await keybus.connect("no-scheme-at-all")


def test_subscribe_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        SubscribeOptions(max_concurrency=0)
    with pytest.raises(ValueError, match="max_attempts"):
        SubscribeOptions(max_attempts=0)
    assert SubscribeOptions(retry_backoff=0.1).backoff(3) == pytest.approx(0.4)
    assert SubscribeOptions(retry_backoff=10, max_retry_backoff=15).backoff(5) == 15


async def test_bad_arguments_get_clear_type_errors(no_leaks: LeakChecker) -> None:
    async with keybus.connect("memory://unit-args") as bus:
        with pytest.raises(TypeError, match="value must be bytes"):
            await bus.publish("t", "text")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="invalid topic"):
            await bus.publish("bad topic!", b"x")
        with pytest.raises(TypeError, match="unknown subscribe option"):
            await bus.subscribe("t", lambda m: None, max_concurency=3)
        with pytest.raises(TypeError, match="header"):
            await bus.publish("t", b"x", headers={"h": 5})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="unknown options"):
        await keybus.connect("memory://unit-args", bogus=1)


async def test_leak_checker_names_leaked_threads_and_fds() -> None:
    stop = threading.Event()
    checker = LeakChecker(timeout=0.2)
    read_fd = write_fd = -1
    checker.start()
    thread = threading.Thread(target=stop.wait, name="kb-leaky-thread")
    thread.start()
    read_fd, write_fd = os.pipe()
    with pytest.raises(LeakError) as info:
        await checker.check()
    stop.set()
    thread.join()
    os.close(read_fd)
    os.close(write_fd)
    report = str(info.value)
    assert "kb-leaky-thread" in report
    assert "native thread" in report
    assert f"fd {read_fd} -> pipe:" in report


async def test_leak_checker_waits_for_resources_that_go_away_in_time() -> None:
    async with LeakChecker(timeout=5):
        task = asyncio.create_task(asyncio.sleep(0.05))
    assert task.done()
