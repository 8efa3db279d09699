"""Keyed lanes (``keybus.dispatch.KeyedDispatcher``): one key at a time and in order,
keys concurrently up to the bound, workers woken only as needed, cancel ends them all."""

from __future__ import annotations

import asyncio

from keybus.dispatch import KeyedDispatcher
from keybus.message import Message
from keybus.testing import LeakChecker
from keybus.work import Work
from tests.helpers import eventually


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

    dispatcher = KeyedDispatcher(process, 256, "unit-burst")
    for offset in range(500):
        dispatcher.submit(Work(Message("t", b"", None, {}, 0, offset), None, None), offset)
    await eventually(lambda: len(done) == 500)
    assert done == list(range(500))  # one worker took the lanes in order
    # Workers live (parked) until cancel: the live ones are every one ever started.
    workers = [t for t in asyncio.all_tasks() if t.get_name() == "keybus-worker:unit-burst"]
    assert len(workers) <= 2, "a worker per ready lane was started"
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


async def test_dispatcher_wakes_parked_workers_after_they_all_parked() -> None:
    """Every worker parks; a new burst must ramp back up to full concurrency."""
    blockers = [asyncio.Event() for _ in range(4)]
    gate = asyncio.Event()
    finished: list[int] = []

    async def process(work: Work) -> None:
        offset = work.message.offset
        await (gate.wait() if offset >= 100 else blockers[offset].wait())
        finished.append(offset)

    dispatcher = KeyedDispatcher(process, 4, "unit-parked")
    for key in range(4):
        dispatcher.submit(Work(Message("t", b"", None, {}, 0, key), None, None), key)
    await eventually(lambda: dispatcher.running == 4, timeout=3.0, what="four running")
    for event in blockers:
        event.set()
    # A worker parks as soon as its work returns and no lane waits: with nothing
    # running, all four are parked.
    await eventually(
        lambda: len(finished) == 4 and dispatcher.running == 0, timeout=3.0, what="four parked"
    )
    for key in range(10):
        dispatcher.submit(Work(Message("t", b"", None, {}, 0, 100 + key), None, None), key)
    await eventually(lambda: dispatcher.running == 4, timeout=3.0, what="four running again")
    workers = [t for t in asyncio.all_tasks() if t.get_name() == "keybus-worker:unit-parked"]
    assert len(workers) == 4, "the parked workers were woken, none replaced"
    gate.set()
    await eventually(lambda: len(finished) == 14, timeout=3.0, what="all done")
    assert await dispatcher.cancel(grace=1.0) == []


async def test_dispatcher_abandoned_work_does_not_let_its_key_run_twice() -> None:
    """An abandoned handler that is slow to unwind still holds its lane: the key's next
    work waits for it, and then runs on a reused lane in order."""
    unwind, unwinding = asyncio.Event(), asyncio.Event()
    log: list[tuple[str, int]] = []

    async def process(work: Work) -> None:
        offset = work.message.offset
        log.append(("start", offset))
        try:
            if offset == 0:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            unwinding.set()
            await unwind.wait()  # slow to unwind
            raise
        finally:
            log.append(("end", offset))

    dispatcher = KeyedDispatcher(process, 4, "unit")
    works = [Work(Message("t", b"", None, {}, 0, o), None, None) for o in range(3)]
    dispatcher.submit(works[0], "k")
    await eventually(lambda: dispatcher.running == 1, timeout=3.0, what="first running")
    dispatcher.submit(works[1], "k")
    KeyedDispatcher.abandon([works[0]])
    await asyncio.wait_for(unwinding.wait(), 5)
    # A probe on another key: the ready queue is FIFO with spare workers, so a wrongly
    # readied works[1] would have started before the probe finishes.
    probe = Work(Message("t", b"", None, {}, 0, 99), None, None)
    dispatcher.submit(probe, "probe")
    await eventually(lambda: ("end", 99) in log, timeout=3.0, what="the probe done")
    assert [e for e in log if e[1] != 99] == [("start", 0)], "the key ran beside the abandon"
    unwind.set()
    await eventually(lambda: ("end", 1) in log, timeout=3.0, what="second done")
    dispatcher.submit(works[2], "k")  # on a lane from the spare pool
    await eventually(lambda: ("end", 2) in log, timeout=3.0, what="third done")
    assert [e for e in log if e[1] != 99] == [
        ("start", 0),
        ("end", 0),
        ("start", 1),
        ("end", 1),
        ("start", 2),
        ("end", 2),
    ]
    assert await dispatcher.cancel(grace=1.0) == []
