"""Kafka-only tests: skipped unless ``kafka`` is in ``KEYBUS_BACKENDS``."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import keybus
from keybus.partitioning import Partition
from keybus.transports.kafka.group_consumer import GroupConsumer
from keybus.transports.kafka.topic_feed import KafkaConsumer
from tests.conftest import Backend, backend_fixture, enabled_backends
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = ROOT / "tools" / "kafka" / "kafka.sh"

if "kafka" not in enabled_backends():
    pytest.skip("kafka is not in KEYBUS_BACKENDS", allow_module_level=True)


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[Backend]:
    """Only Kafka here: overrides the suite-wide backend parametrisation."""
    async for value in backend_fixture("kafka"):
        yield value


class Worker:
    """A consumer process (``tests/kafka/_worker.py``)."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name

    async def ready(self, timeout: float = 60.0) -> None:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        assert line.strip() == b"ready", f"worker {self.name} said {line!r}"

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.finish()

    async def terminate(self, timeout: float = 30.0) -> None:
        if self.process.returncode is None:
            self.process.terminate()
        await self.finish(timeout)

    async def finish(self, timeout: float = 30.0) -> None:
        assert self.process.stdout is not None
        try:
            await asyncio.wait_for(self.process.stdout.read(), timeout)
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise


Spawn = Callable[..., Awaitable[Worker]]


@pytest_asyncio.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """``await spawn(url, topic, group, name, log_path, delay)``: a started worker;
    every worker still running at the end is killed and reaped."""
    workers: list[Worker] = []

    async def start(
        url: str, topic: str, group: str, name: str, log: Path, delay: float = 0.002
    ) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.kafka._worker",
            url,
            topic,
            group,
            name,
            str(log),
            str(delay),
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        worker = Worker(process, name)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        await worker.kill()


class FakeRd:
    """Stands in for the librdkafka consumer inside a rebalance callback: records what
    the transport asks of it. (Recorded, not raised: the transport logs and survives a
    failing commit, so an exception here would not fail a test.)"""

    def __init__(self) -> None:
        self.metadata_requests = 0
        self.commits: list[Any] = []  # the offsets of each commit
        self.unassigned: list[Any] = []

    def list_topics(self, *args: Any, **kwargs: Any) -> None:
        self.metadata_requests += 1

    def commit(self, *args: Any, **kwargs: Any) -> None:
        self.commits.append(kwargs.get("offsets"))

    def incremental_unassign(self, partitions: list[Any]) -> None:
        self.unassigned.extend(partitions)


async def on_consumer_thread(callback: Callable[..., object], *args: Any) -> None:
    """Run a librdkafka callback of ours the way librdkafka does: on a thread of its own
    (the consumer thread), while the loop goes on serving what the callback asks of it."""
    thread = threading.Thread(target=callback, args=args)
    thread.start()
    await eventually(lambda: not thread.is_alive(), timeout=15.0, what="the callback returned")
    thread.join()


# White-box access, in one place: the user's handle shows neither the partitions the core
# holds nor the transport behind it.


def core_partitions(sub: keybus.Subscription) -> set[Partition]:
    """The partitions the core holds for ``sub`` (dropped as soon as a revoke begins)."""
    return set(sub._engine._assigned)


def feed_of(sub: keybus.Subscription) -> KafkaConsumer:
    """The Kafka consumer (topic feed) behind ``sub``."""
    consumer = sub._engine._consumer
    assert isinstance(consumer, KafkaConsumer)
    return consumer


def group_consumers(bus: keybus.EventBus) -> list[GroupConsumer]:
    """The bus's group consumers whose thread may still run."""
    shared: list[GroupConsumer] = bus._transport._shared  # type: ignore[attr-defined]
    return shared


async def kafka_sh(command: str, timeout: float = 120.0) -> None:
    process = await asyncio.create_subprocess_exec(
        str(KAFKA_SH),
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    code = await asyncio.wait_for(process.wait(), timeout)
    assert code == 0, f"kafka.sh {command} exited with {code}"
