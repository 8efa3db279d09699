"""``keybus dlq`` against the real brokers, the service in a process of its own
(``tests/parked_service_proc.py``): a parked key listed, a replay that fails again leaves
it parked and the command says so (exit 3), the handler fixed -> the command's replay
has the service hand the parked messages in order, then the live ones flow."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import keybus
from keybus.cli.dlq import PARKED
from keybus.testing import LeakChecker
from tests.cli.test_cli_brokers import COMMAND_TIMEOUT, drop_kafka_group, keybus_cli
from tests.conftest import Backend, backend_fixture, enabled_backends
from tests.helpers import envelope, eventually

BROKERS = [name for name in ("kafka", "nats") if name in enabled_backends()]
if not BROKERS:
    pytest.skip("no broker in KEYBUS_BACKENDS", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(params=BROKERS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async for value in backend_fixture(request.param):
        yield value


class Service:
    """The service process and the (aggregate, version) pairs it handled, in order."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.handled: list[tuple[str, int]] = []
        self.ready = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            parts = line.decode().split()
            if parts == ["ready"]:
                self.ready.set()
            elif len(parts) == 3 and parts[0] == "handled":
                self.handled.append((parts[1], int(parts[2])))

    def versions(self, key: str) -> list[int]:
        return [version for aggregate, version in self.handled if aggregate == key]


@contextlib.asynccontextmanager
async def service(backend: Backend, topic: str, group: str, broken: Path) -> AsyncIterator[Service]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.parked_service_proc", backend.url, topic, group, str(broken),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    running = Service(process)
    try:
        await asyncio.wait_for(running.ready.wait(), COMMAND_TIMEOUT)
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)  # a clean leave: no session to wait out
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        await running.reader


async def test_dlq_replay_has_the_service_replay_in_order_and_says_when_it_fails_again(
    backend: Backend, no_leaks: LeakChecker, tmp_path: Path
) -> None:
    topic, group = backend.topic("dlq"), backend.topic("g")
    backend.topics += [f"{topic}.dlq", f"{topic}.dlq.parked"]
    broken = tmp_path / "broken"
    broken.write_text("K 3\n")
    async with keybus.connect(backend.url, group=backend.topic("test")) as bus:
        await bus.ensure_topic(topic)
        try:
            async with service(backend, topic, group, broken) as svc:
                for version in range(1, 6):
                    await bus.publish_envelope(topic, envelope("K", version))
                await bus.publish_envelope(topic, envelope("other", 1))
                await eventually(
                    lambda: svc.versions("other") == [1] and svc.versions("K") == [1, 2],
                    timeout=COMMAND_TIMEOUT,
                    what="K v1, v2 and other handled",
                )

                async def parked(count: int) -> bool:
                    return sum(p.count for p in await bus.parked(topic, group)) == count

                await eventually(lambda: parked(3), timeout=COMMAND_TIMEOUT, what="v3..v5")
                code, out, err = await keybus_cli(
                    "dlq", "list", backend.url, topic, "--group", group, "--fail-if-parked"
                )
                assert code == PARKED, err
                assert "K" in out
                code, out, err = await keybus_cli(
                    "dlq", "list", backend.url, topic, "--group", group
                )
                assert code == 0, err

                # Not fixed: the service's replay fails again; the command says so.
                code, out, err = await keybus_cli(
                    "dlq", "replay", backend.url, topic, "--key", "K", "--group", group,
                    "--timeout", "30",
                )  # fmt: skip
                assert code == PARKED, (out, err)
                assert "still parked" in err
                assert "cannot apply K 3" in err
                assert svc.versions("K") == [1, 2]

                broken.write_text("")  # the handler fixed (deployed)
                await bus.publish_envelope(topic, envelope("K", 6))  # live, parked
                await eventually(lambda: parked(4), timeout=COMMAND_TIMEOUT, what="v6")
                code, out, err = await keybus_cli(
                    "dlq", "replay", backend.url, topic, "--key", "K", "--group", group,
                    "--timeout", "30",
                )  # fmt: skip
                assert code == 0, (out, err)
                assert "replayed 4 parked message(s) of K" in out
                # (The service's lines reach the test through a reader task of its own.)
                await eventually(
                    lambda: svc.versions("K") == [1, 2, 3, 4, 5, 6],
                    timeout=COMMAND_TIMEOUT,
                    what="v3..v6 replayed in order",
                )
                await bus.publish_envelope(topic, envelope("K", 7))
                await eventually(
                    lambda: svc.versions("K")[-1:] == [7], timeout=COMMAND_TIMEOUT, what="v7"
                )
                assert svc.versions("K") == list(range(1, 8))  # in order, once each
                code, out, err = await keybus_cli(
                    "dlq", "list", backend.url, topic, "--group", group, "--fail-if-parked"
                )
                assert code == 0, err
                assert "no parked keys" in out
                code, out, err = await keybus_cli(
                    "dlq", "replay", backend.url, topic, "--key", "K", "--group", group
                )
                assert code == 0, err
                assert "K is not parked" in out
        finally:
            if backend.name == "kafka":
                await drop_kafka_group(backend.url, group)
