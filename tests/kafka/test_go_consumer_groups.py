"""keybus in consumer groups of the Go services. Their sarama consumers use the eager
``range`` assignor; keybus's default is ``cooperative-sticky``, and a Kafka coordinator
refuses a member whose assignors the group's members do not share
(``INCONSISTENT_GROUP_PROTOCOL``). A raw confluent-kafka consumer with
``partition.assignment.strategy=range`` stands in for the Go member: it speaks the same
classic protocol with the same assignor name.

- joining such a group fails promptly with the remedy, and leaves nothing behind;
- with ``consumer_config={"partition.assignment.strategy": "range"}`` keybus joins it
  (eager rebalancing: whole assignments) and the members split the partitions;
- a running subscription whose group was taken over meanwhile logs the conflict once;
- a group handed over (the Go service stops, keybus starts) resumes at its commits.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from confluent_kafka import Consumer, TopicPartition

import keybus
from keybus.testing import LeakChecker
from keybus.transports.kafka import bootstrap_servers
from keybus.transports.kafka.config import KafkaSettings
from tests.conftest import Backend, unique
from tests.helpers import Collected, eventually
from tests.kafka.conftest import feed_of

ROOT = Path(__file__).resolve().parents[2]
EAGER = {"partition.assignment.strategy": "range"}


class RangeMember:
    """A sarama-like member of ``group`` on ``topic``: a confluent-kafka consumer with the
    eager ``range`` assignor, polled from a thread of its own. It records its current
    assignment and the records it handled, stops after ``limit`` records if given, and
    with ``commit`` commits each handled record's offset synchronously."""

    def __init__(
        self, url: str, topic: str, group: str, *, commit: bool = False, limit: int | None = None
    ) -> None:
        self.assigned: set[int] = set()
        self.handled: list[tuple[int, int, str, bytes]] = []  # partition, offset, key, value
        self.committed: dict[int, int] = {}  # partition -> next offset, confirmed
        self.errors: list[str] = []
        self._commit = commit
        self._limit = limit
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap_servers(url),
                "group.id": group,
                "partition.assignment.strategy": "range",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 250,
            }
        )
        self._consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._thread = threading.Thread(target=self._run, name=f"range-member:{group}")
        self._thread.start()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned = {tp.partition for tp in partitions}

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned = set()

    def _run(self) -> None:
        consumer = self._consumer
        try:
            while not self._stop.is_set():
                wanted = 100 if self._limit is None else self._limit - len(self.handled)
                if wanted <= 0:
                    break
                for record in consumer.consume(wanted, 0.05):
                    error = record.error()
                    if error is not None:
                        self.errors.append(error.name())
                        continue
                    partition, offset = record.partition(), record.offset()
                    self.handled.append((partition, offset, record.key().decode(), record.value()))
                    if self._commit:
                        tp = TopicPartition(record.topic(), partition, offset + 1)
                        for done in consumer.commit(offsets=[tp], asynchronous=False) or []:
                            self.committed[done.partition] = done.offset
        finally:
            consumer.close()  # leaves the group

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    async def close(self) -> None:
        self._stop.set()
        await eventually(lambda: self.finished, what="the range member closed")
        self._thread.join()


@pytest_asyncio.fixture
async def range_members() -> AsyncIterator[list[RangeMember]]:
    """Every range member a test starts is closed at its end, passed or not (before the
    leak check)."""
    members: list[RangeMember] = []
    yield members
    for member in members:
        await member.close()


async def _topic(bus: keybus.EventBus, backend: Backend, label: str, partitions: int) -> str:
    topic = backend.topic(label)
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=partitions))
    return topic


async def test_joining_a_group_of_eager_range_members_fails_promptly_with_the_remedy(
    no_leaks: LeakChecker, backend: Backend, range_members: list[RangeMember]
) -> None:
    group = unique("go-range-g")
    async with keybus.connect(backend.url, group=group) as bus:
        topic = await _topic(bus, backend, "go-range", 3)
        go = RangeMember(backend.url, topic, group)
        range_members.append(go)
        await eventually(lambda: go.assigned == {0, 1, 2}, what="the range member's assignment")
        started = time.monotonic()
        with pytest.raises(keybus.SubscribeError) as info:
            await bus.subscribe(topic, Collected())
        took = time.monotonic() - started
        # The coordinator answers the first JoinGroup at once; assign_timeout is 30 s.
        assert took < 5.0, f"subscribe failed after {took:.1f} s"
        error = info.value
        assert (error.topic, error.group) == (topic, group)
        assert "INCONSISTENT_GROUP_PROTOCOL" in error.reason
        assert "different partition assignment protocol" in error.reason
        assert "sarama's eager range" in error.reason
        assert "its own group" in error.reason
        assert "consumer_config={'partition.assignment.strategy': 'range'}" in error.reason
        assert "INCONSISTENT_GROUP_PROTOCOL" in repr(error.__cause__)
        assert not bus.subscriptions
        # The Go member was not disturbed.
        assert go.assigned == {0, 1, 2}
        assert not go.errors


async def test_with_the_range_assignor_keybus_joins_the_go_members_and_they_split_the_work(
    no_leaks: LeakChecker, backend: Backend, range_members: list[RangeMember]
) -> None:
    group = unique("go-eager-g")
    partitions = 4
    async with keybus.connect(backend.url, group=group, consumer_config=EAGER) as bus:
        topic = await _topic(bus, backend, "go-eager", partitions)
        go = RangeMember(backend.url, topic, group, commit=True)
        range_members.append(go)
        await eventually(lambda: len(go.assigned) == partitions, what="the range member's join")
        got = Collected()
        sub = await bus.subscribe(topic, got)
        ours = feed_of(sub).owned
        # An eager rebalance: the Go member gave up everything and got its half back.
        await eventually(
            lambda: len(go.assigned) == 2 and go.assigned.isdisjoint(ours),
            what="the partitions split",
        )
        assert len(ours) == 2

        keys = [f"agg-{i}" for i in range(40)]
        sent: list[tuple[str, bytes]] = []

        async def publish(rounds: range) -> None:
            for n in rounds:
                for key in keys:
                    value = f"{key}:{n}".encode()
                    await bus.publish(topic, value, key=key)
                    sent.append((key, value))

        def handled() -> Counter[bytes]:
            return Counter([m.value for m in got] + [value for *_, value in go.handled])

        await publish(range(5))
        await eventually(lambda: sum(handled().values()) >= len(sent), what="every record")
        counts = handled()
        assert set(counts) == {value for _, value in sent}
        assert max(counts.values()) == 1, "a record was handled twice"
        # Each key on one member, per-key order on keybus's side.
        ours_keys = {m.key for m in got}
        assert ours_keys.isdisjoint(key for _, _, key, _ in go.handled)
        assert {m.partition for m in got} <= ours
        seen: dict[str, list[int]] = defaultdict(list)
        for m in got:
            seen[m.key].append(int(m.value.rsplit(b":", 1)[1]))
        assert all(v == sorted(v) for v in seen.values()), seen

        # The Go member leaves: keybus revokes (eager: everything), gets all four back and
        # starts on the Go member's partitions at its commits.
        await go.close()
        await eventually(lambda: ours == set(range(partitions)), what="keybus owns everything")
        before = len(sent)
        await publish(range(5, 8))
        await eventually(
            lambda: sum(handled().values()) >= len(sent), what="the records after the leave"
        )
        counts = handled()
        assert set(counts) == {value for _, value in sent}
        assert max(counts.values()) == 1
        assert {value for _, value in sent[before:]} <= {m.value for m in got}


@pytest.mark.parametrize(
    ("config", "eager"),
    [
        ({}, False),  # keybus's default: cooperative-sticky
        (EAGER, True),
        ({"partition.assignment.strategy": "roundrobin,range"}, True),
        ({"partition.assignment.strategy": " Cooperative-Sticky "}, False),
        ({"group.protocol": "consumer"}, False),  # KIP-848: incremental
    ],
)
def test_the_rebalance_protocol_follows_the_configured_assignor(
    config: dict[str, str], eager: bool
) -> None:
    assert KafkaSettings(url="kafka://h:9092", consumer_config=config).eager is eager


async def test_an_eager_member_serves_several_topics_through_whole_assignment_rebalances(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    # One shared consumer for both topics: the second subscribe is an eager rebalance,
    # which revokes the first topic's partitions too and assigns both topics anew.
    async with keybus.connect(
        backend.url, group=unique("go-eager2-g"), consumer_config=EAGER
    ) as bus:
        first = await _topic(bus, backend, "e-a", 2)
        second = await _topic(bus, backend, "e-b", 2)
        got_a, got_b = Collected(), Collected()
        sub_a = await bus.subscribe(first, got_a)
        await bus.publish(sub_a.topic, b"a1", key="k")
        await eventually(lambda: got_a.values() == [b"a1"], what="the first record")
        sub_b = await bus.subscribe(second, got_b)
        assert feed_of(sub_a).owned == feed_of(sub_b).owned == {0, 1}
        await bus.publish(sub_a.topic, b"a2", key="k")
        await bus.publish(sub_b.topic, b"b1", key="k")
        await eventually(lambda: got_b.values() == [b"b1"], what="the second topic's record")
        await eventually(lambda: got_a.values() == [b"a1", b"a2"], what="the first topic again")
        await sub_b.unsubscribe()  # another eager rebalance; the first topic carries on
        await bus.publish(sub_a.topic, b"a3", key="k")
        await eventually(lambda: got_a.values() == [b"a1", b"a2", b"a3"], what="after it")
        assert feed_of(sub_a).owned == {0, 1}


async def test_an_eager_member_joining_a_cooperative_group_is_told_the_other_way_round(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    group = unique("go-coop-g")
    async with keybus.connect(backend.url, group=group) as cooperative:
        topic = await _topic(cooperative, backend, "go-coop", 2)
        await cooperative.subscribe(topic, Collected())
        async with keybus.connect(backend.url, group=group, consumer_config=EAGER) as eager:
            with pytest.raises(keybus.SubscribeError) as info:
                await eager.subscribe(topic, Collected())
            assert "INCONSISTENT_GROUP_PROTOCOL" in info.value.reason
            assert "keybus's default cooperative-sticky" in info.value.reason
            assert not eager.subscriptions


async def test_a_group_handed_over_from_a_go_service_resumes_at_its_commits(
    no_leaks: LeakChecker, backend: Backend, range_members: list[RangeMember]
) -> None:
    group = unique("go-handover-g")
    partitions = 3
    async with keybus.connect(backend.url, group=group) as bus:
        topic = await _topic(bus, backend, "go-handover", partitions)
        keys = [backend.key_on(p, partitions) for p in range(partitions)]
        for n in range(40):
            for key in keys:
                await bus.publish(topic, f"{key}:{n}".encode(), key=key)
        total = 40 * partitions
        # The Go service handles part of the topic, commits, stops.
        go = RangeMember(backend.url, topic, group, commit=True, limit=50)
        range_members.append(go)
        await eventually(lambda: go.finished, what="the Go member handled its part")
        await go.close()
        assert len(go.handled) == 50
        done: dict[int, int] = {}
        for partition, offset, _, _ in go.handled:
            done[partition] = max(done.get(partition, 0), offset + 1)
        assert go.committed == done  # every commit confirmed, synchronously

        got = Collected()
        await bus.subscribe(topic, got)
        expected = total - sum(done.values())
        await eventually(lambda: len(got) >= expected, what=f"the {expected} records left")
        handled = {(m.partition, m.offset) for m in got}
        assert len(got) == expected == len(handled)
        # A partition's records arrive in offset order: had keybus started before a
        # commit, the records before it would have come first.
        for partition in range(partitions):
            offsets = [m.offset for m in got if m.partition == partition]
            assert offsets == list(range(done.get(partition, 0), 40)), partition


# A keybus service (a process of its own, so that it can be frozen) whose subscription is
# running when its group is taken over by a range member: SIGSTOP past its session
# timeout, the range member gets the group, SIGCONT. Its rejoin is refused.
_SERVICE = """
import asyncio, logging, signal, sys
import keybus

async def main(url, topic, group):
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("keybus.kafka").setLevel(logging.DEBUG)
    logging.getLogger("keybus.kafka.librdkafka").setLevel(logging.WARNING)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    config = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 250}
    async with keybus.connect(url, group=group, consumer_config=config) as bus:
        async def handle(message):
            print("handled", message.value.decode(), flush=True)
        await bus.subscribe(topic, handle)
        print("ready", flush=True)
        await stop.wait()
    print("closed", flush=True)

asyncio.run(main(*sys.argv[1:4]))
"""


class Service:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.out: list[str] = []
        self.err: list[str] = []
        assert process.stdout is not None
        assert process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(process.stdout, self.out)),
            asyncio.create_task(self._read(process.stderr, self.err)),
        ]

    @staticmethod
    async def _read(stream: asyncio.StreamReader, into: list[str]) -> None:
        async for line in stream:
            into.append(line.decode().rstrip())

    def logged(self, text: str) -> list[str]:
        return [line for line in self.err if text in line]

    async def finish(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await asyncio.gather(*self._readers)


@pytest_asyncio.fixture
async def services() -> AsyncIterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        await service.finish()


@pytest.mark.slow
async def test_a_running_subscription_refused_its_rejoin_logs_the_conflict_once(
    no_leaks: LeakChecker,
    backend: Backend,
    range_members: list[RangeMember],
    services: list[Service],
) -> None:
    group = unique("go-takeover-g")
    async with keybus.connect(backend.url) as bus:
        topic = await _topic(bus, backend, "go-takeover", 2)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _SERVICE,
            backend.url,
            topic,
            group,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        service = Service(process)
        services.append(service)
        await eventually(lambda: "ready" in service.out, timeout=60.0, what="the service")
        process.send_signal(signal.SIGSTOP)
        try:
            # The range member is refused while the service is in the group, and gets it
            # once the frozen service's session (2 s) expired.
            go = RangeMember(backend.url, topic, group)
            range_members.append(go)
            await eventually(lambda: go.assigned == {0, 1}, what="the range member took over")
        finally:
            process.send_signal(signal.SIGCONT)
        refused = "refused the join"  # the DEBUG line of every refusal after the first

        def refusals() -> int:
            return len(service.logged("refused this consumer's join")) + len(
                service.logged(refused)
            )

        await eventually(lambda: len(service.logged(refused)) >= 2, what="repeated refusals")
        errors = [line for line in service.err if line.startswith("ERROR")]
        assert len(errors) == 1, errors
        assert "INCONSISTENT_GROUP_PROTOCOL" in errors[0]
        assert "sarama's eager range" in errors[0]
        assert "'partition.assignment.strategy': 'range'" in errors[0]
        assert f"subscriptions to {topic} get no records" in errors[0]
        assert refusals() >= 3
        # The Go member leaves: the service's next join is accepted and it consumes again.
        await go.close()
        key = backend.key_on(0, 2)
        await bus.publish(topic, b"after", key=key)
        await eventually(lambda: "handled after" in service.out, what="the service resumed")
        assert len([line for line in service.err if line.startswith("ERROR")]) == 1
        process.terminate()
        await eventually(lambda: "closed" in service.out, what="the service closed")
        assert await process.wait() == 0
