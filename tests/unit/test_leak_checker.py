"""The leak checker itself: identities, not counts; nothing the test did not leave behind."""

from __future__ import annotations

import _thread
import asyncio
import os
import threading

import pytest

from keybus.testing import LeakChecker, LeakError


async def test_a_finished_foreign_thread_is_not_a_leak() -> None:
    # A thread not started by ``threading`` that touched it is listed as a _DummyThread,
    # whose is_alive() stays True after the thread ended.
    checker = LeakChecker(timeout=0.3)
    checker.start()
    ended = threading.Event()

    def run() -> None:
        threading.current_thread()
        ended.set()

    _thread.start_new_thread(run, ())
    assert await asyncio.to_thread(ended.wait, 5)
    await checker.check()


async def test_idle_default_executor_workers_belong_to_the_loop(no_leaks: LeakChecker) -> None:
    # asyncio.to_thread starts the loop's default executor, whose workers live until the
    # loop closes, after every fixture's teardown.
    assert await asyncio.to_thread(lambda: 42) == 42


async def test_a_default_executor_worker_still_running_a_call_is_reported() -> None:
    release = threading.Event()
    checker = LeakChecker(timeout=0.3)
    checker.start()
    loop = asyncio.get_running_loop()
    running = loop.run_in_executor(None, release.wait)
    try:
        with pytest.raises(LeakError, match="thread 'asyncio_"):
            await checker.check()
    finally:
        release.set()
        await running


async def test_a_new_thread_with_the_ident_of_one_that_ended_is_reported() -> None:
    old_stop = threading.Event()
    old = threading.Thread(target=old_stop.wait, name="kb-old-thread")
    old.start()
    checker = LeakChecker(timeout=0.3)
    checker.start()
    old_ident = old.ident
    old_stop.set()
    old.join()
    stop = threading.Event()
    fresh = threading.Thread(target=stop.wait, name="kb-new-thread")
    fresh.start()
    try:
        # CPython usually hands the ended thread's ident to the next one at once; without
        # the reuse, any checker would see the new thread, and this proves nothing.
        if fresh.ident != old_ident:
            pytest.skip("the new thread did not reuse the ended one's ident")
        with pytest.raises(LeakError, match="kb-new-thread"):
            await checker.check()
    finally:
        stop.set()
        fresh.join()


async def test_a_new_fd_with_the_number_of_one_that_was_closed_is_reported() -> None:
    read_fd, write_fd = os.pipe()
    checker = LeakChecker(timeout=0.3)
    checker.start()
    os.close(read_fd)
    os.close(write_fd)
    new_read, new_write = os.pipe()
    try:
        assert {new_read, new_write} == {read_fd, write_fd}
        with pytest.raises(LeakError, match=f"fd {new_read} -> pipe:"):
            await checker.check()
    finally:
        os.close(new_read)
        os.close(new_write)


async def test_leak_checker_reports_a_task_left_running() -> None:
    leaked = asyncio.Event()
    checker = LeakChecker(timeout=0.2)
    with pytest.raises(LeakError, match="keybus-test-leak"):
        async with checker:
            task = asyncio.create_task(leaked.wait(), name="keybus-test-leak")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


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
