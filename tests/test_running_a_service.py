"""``keybus.App`` and ``keybus run``: handlers declared by decorators handle what is
published; SIGTERM closes gracefully (exit 0) and loses nothing acknowledged — a second
run handles what the first left uncommitted; ``--workers N`` restarts a killed worker
and leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

import keybus
from keybus.app import EXIT_OK
from keybus.testing import LeakChecker
from tests.conftest import Backend, BusFactory, backend_fixture, enabled_backends, unique
from tests.helpers import envelope, eventually, reordered_after_redelivery

ROOT = Path(__file__).resolve().parents[1]


async def test_an_app_handles_envelopes_runs_its_hooks_and_stops_gracefully(
    no_leaks: LeakChecker,
) -> None:
    app = keybus.App("memory://app-test", group="billing")
    seen: list[tuple[str, int]] = []
    events: list[str] = []

    @app.subscribe_envelope("orders")
    async def on_order(env: keybus.Envelope) -> None:
        seen.append((env.aggregate_id, env.event_version))

    @app.subscribe("raw")
    async def on_raw(message: keybus.Message) -> None:
        events.append(f"raw {message.value.decode()}")

    @app.on_startup
    async def started() -> None:
        events.append("startup")

    @app.on_shutdown
    def stopped() -> None:
        events.append("shutdown")

    running = asyncio.create_task(app.run(install_signal_handlers=False))
    await eventually(lambda: "startup" in events, what="the app running")
    for version in range(1, 6):
        await app.bus.publish_envelope("orders", envelope("order-42", version))
    await app.bus.publish("raw", b"x")
    await eventually(lambda: len(seen) == 5 and "raw x" in events, what="everything handled")
    assert seen == [("order-42", v) for v in range(1, 6)]
    app.stop()
    assert await asyncio.wait_for(running, 10) == EXIT_OK
    assert events[-1] == "shutdown"
    with pytest.raises(RuntimeError, match="not running"):
        _ = app.bus


async def test_a_cancelled_app_closes_then_passes_the_cancellation_on(
    no_leaks: LeakChecker,
) -> None:
    app = keybus.App("memory://app-cancel")
    closed: list[bool] = []
    app.on_shutdown(lambda: closed.append(True))
    started = asyncio.Event()
    app.on_startup(started.set)
    running = asyncio.create_task(app.run(install_signal_handlers=False))
    await asyncio.wait_for(started.wait(), 10)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert closed == [True]


# -- keybus run, in processes, on the brokers -------------------------------------------


@pytest_asyncio.fixture(params=[b for b in ("kafka", "nats") if b in enabled_backends()])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """The brokers only: the app runs in another process (memory:// is per process)."""
    async for value in backend_fixture(request.param):
        yield value


def _run(url: str, topic: str, group: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KEYBUS_TEST_URL": url,
        "KEYBUS_TEST_TOPIC": topic,
        "KEYBUS_TEST_GROUP": group,
        "KEYBUS_TEST_LOG": str(log),
        "KEYBUS_TEST_DELAY": "0.005",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "keybus", "run", "tests.apps.sample:app", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _lines(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _handled(log: Path) -> list[tuple[str, int]]:
    return [(p[1], int(p[2])) for p in _lines(log) if len(p) == 3]


def _ready(log: Path) -> list[int]:
    return [int(p[1]) for p in _lines(log) if p[0] == "ready"]


@pytest.mark.slow
async def test_sigterm_under_load_exits_0_and_a_second_run_handles_the_rest(
    open_bus: BusFactory, backend: Backend, tmp_path: Path
) -> None:
    topic, group, log = backend.topic("run"), unique("run-g"), tmp_path / "handled.log"
    publisher = await open_bus()
    await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=3))
    first = _run(backend.url, topic, group, log)
    try:
        await eventually(lambda: _ready(log) != [], what="the app running", timeout=60)
        acked: list[tuple[str, int]] = []

        async def produce(aggregate: str) -> None:
            for version in range(1, 41):
                await publisher.publish_envelope(topic, envelope(aggregate, version))
                acked.append((aggregate, version))

        producing = asyncio.gather(*(produce(f"agg-{i}") for i in range(50)))
        await eventually(lambda: len(_handled(log)) >= 300, what="handling under load")
        first.send_signal(signal.SIGTERM)
        began = time.monotonic()
        code = await asyncio.to_thread(first.wait, 30)
        took = time.monotonic() - began
        assert code == 0, first.stderr.read().decode() if first.stderr else code
        assert took < 5.0 + 10.5, f"the close took {took:.1f} s"
        await producing
    finally:
        if first.poll() is None:
            first.kill()
    handled_by_first = len(_handled(log))
    second = _run(backend.url, topic, group, log)
    try:
        everything = set(acked)
        await eventually(
            lambda: set(_handled(log)) >= everything, what="every acknowledged envelope", timeout=90
        )
    finally:
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 30) == 0
    handled = _handled(log)
    versions: dict[str, list[int]] = {}
    for aggregate, version in handled:
        versions.setdefault(aggregate, []).append(version)
    assert reordered_after_redelivery(versions) == {}, "first handled out of order"
    print(
        f"first run handled {handled_by_first} of {len(acked)} before SIGTERM; "
        f"{len(handled) - len(set(handled))} handled twice across the two runs"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (its parent has not reaped it yet).
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = tmp_path / "workers.log"
    process = _run("memory://workers", "orders", "g", log, "--workers", "2")
    yield process, log
    if process.poll() is None:
        process.kill()
        process.wait(10)


@pytest.mark.slow
async def test_workers_a_killed_one_is_restarted_and_none_outlives_the_supervisor(
    supervisor: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, log = supervisor
    await eventually(lambda: len(_ready(log)) == 2, what="two workers running", timeout=60)
    first, other = _ready(log)
    os.kill(first, signal.SIGKILL)
    await eventually(lambda: len(_ready(log)) == 3, what="the killed worker restarted", timeout=30)
    replacement = _ready(log)[-1]
    assert replacement not in (first, other)
    process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.wait, 30)
    assert code == 0, process.stderr.read().decode() if process.stderr else code
    assert not [pid for pid in (other, replacement) if _alive(pid)], "a worker outlived it"


@pytest.mark.slow
async def test_workers_die_with_a_killed_supervisor(
    supervisor: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, log = supervisor
    await eventually(lambda: len(_ready(log)) == 2, what="two workers running", timeout=60)
    process.kill()  # no chance to forward anything: PR_SET_PDEATHSIG does it
    process.wait(10)
    workers = _ready(log)
    await eventually(
        lambda: not [pid for pid in workers if _alive(pid)], what="the workers gone", timeout=30
    )


def test_a_worker_started_while_the_stop_signal_arrives_gets_it_too(tmp_path: Path) -> None:
    """SIGTERM reaches the supervisor while it starts a worker: that worker is sent it
    as well (not left to be killed past the close bound), and no worker is started
    after it."""
    log = tmp_path / "workers.log"
    close_timeout = 1.0
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.supervisor_proc", str(log), "2", str(close_timeout)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    began = time.monotonic()
    try:
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    took = time.monotonic() - began
    err = process.stderr.read().decode() if process.stderr else ""
    assert "did not stop in time" not in err, err
    # (the kill would come at close_timeout + 10 s; a prompt stop takes a python start)
    assert took < close_timeout + 5.0, f"the supervisor took {took:.1f} s"
    assert code == EXIT_OK, err
    started = [int(p[1]) for p in _lines(log) if p[0] == "ready"]
    assert len(started) <= 1, "a worker was started after the signal"
    assert not [pid for pid in started if _alive(pid)], "a worker outlived the supervisor"
