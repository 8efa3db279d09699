"""The parked-keys store's records, the replay's read-back and the version guard's LRU,
without a bus (the behaviour on every backend is in the conformance kit's ParkingSuite)."""

from __future__ import annotations

import pytest

import keybus
from keybus.message import Message
from keybus.options import SubscribeOptions
from keybus.parking import Parked, encode, load, store_key, to_replay
from keybus.testing.conformance.helpers import envelope
from keybus.testing.leaks import LeakChecker
from keybus.versions import VersionGuard


def _record(group: str, key: str, state: Parked | None) -> Message:
    return Message("t.dlq.parked", encode(state), store_key(group, key))


def test_the_last_record_of_a_key_wins_and_other_groups_and_junk_are_ignored() -> None:
    parked = Parked(1, 7, "e1", "RuntimeError: x", 100.0)
    records = [
        _record("g", "A", parked),
        _record("g", "B", parked),
        _record("g", "B", None),  # B unparked
        _record("other", "C", parked),
        Message("t.dlq.parked", b"not json", "g/D"),
        Message("t.dlq.parked", b'{"state":"parked"}', "g/E"),  # no position
    ]
    loaded = load(records, "g")
    assert list(loaded) == ["A"]
    assert (loaded["A"].partition, loaded["A"].offset, loaded["A"].event_id) == (1, 7, "e1")
    assert loaded["A"].view("t", "A").first_failure == "t/1/7"


def test_a_replay_reads_back_its_group_and_key_from_the_first_failure_on_once_each() -> None:
    state = Parked(0, 5, None, "r", 0.0)

    def letter(offset: int, *, key: str = "K", group: str = "g", **extra: bytes) -> Message:
        headers = {
            "X-Original-Topic": b"t",
            "X-Original-Partition": b"0",
            "X-Original-Offset": str(offset).encode(),
            "X-Group": group.encode(),
            "X-Error": b"e",
            "App": b"kept",
            **extra,
        }
        return Message("t.dlq", f"v{offset}".encode(), key, headers)

    letters = [
        letter(4),  # before the first failure: an earlier parking's
        letter(6),
        letter(5),
        letter(6),  # written twice (a crash before its commit)
        letter(7, group="other"),
        letter(8, key="L"),
        letter(9, **{"X-Discarded": b"2"}),
    ]
    replay = to_replay(letters, "t", "g", "K", state)
    assert [(m.offset, m.value) for m in replay] == [(5, b"v5"), (6, b"v6")]
    assert dict(replay[0].headers) == {"App": b"kept"}


def test_the_version_guard_forgets_the_least_recently_used_aggregate() -> None:
    guard = VersionGuard(2)
    for aggregate in ("a", "b"):
        guard.handled(envelope(aggregate, 1))
    assert guard.check(envelope("a", 1)) == -1
    assert guard.check(envelope("a", 3)) == 1
    assert guard.check(envelope("a", 2)) == 0
    guard.handled(envelope("a", 2))  # "a" used last: "b" goes first
    guard.handled(envelope("c", 1))
    assert guard.check(envelope("b", 1)) == 0  # forgotten: taken as it comes
    assert guard.check(envelope("a", 2)) == -1


@pytest.mark.parametrize(
    "options",
    [{"on_dead_letter": "stop"}, {"versions": "loose"}, {"version_window": 0}],
)
def test_bad_parking_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        SubscribeOptions(**options)  # type: ignore[arg-type]


async def test_versions_need_an_envelope_subscription(no_leaks: LeakChecker) -> None:
    async with keybus.connect("memory://parking-unit") as bus:
        with pytest.raises(ValueError, match="envelope"):
            await bus.subscribe("t", lambda m: None, versions="strict")
        with pytest.raises(ValueError, match="no subscription"):
            await bus.replay_parked("t", key="K")
        sub = await bus.subscribe("t", lambda m: None)
        with pytest.raises(ValueError, match="does not park"):
            await bus.discard_parked("t", key="K")
        await sub.unsubscribe()


def test_stored_versions_load_the_last_of_each_aggregate_of_the_partitions_owned() -> None:
    from keybus.versions import encode as encode_version
    from keybus.versions import load as load_versions

    def record(name: str, version: int, partition: int) -> Message:
        return Message("t.dlq.versions", encode_version(version, partition), name)

    records = [
        record("g/A", 1, 0),
        record("g/B", 4, 1),
        record("g/A", 3, 0),  # A's later record wins
        record("g/C", 2, 2),  # not owned
        record("other/D", 9, 0),  # another group's
        Message("t.dlq.versions", b"junk", "g/E"),
    ]
    assert load_versions(records, "g", {0, 1}, 10) == {"B": (4, 1), "A": (3, 0)}
    assert load_versions(records, "g", {0, 1}, 1) == {"A": (3, 0)}  # the latest written


def test_the_guard_prefers_what_it_handled_and_forgets_revoked_partitions() -> None:
    guard = VersionGuard(10, persistent=True)
    guard.handled(envelope("A", 5), 0)
    guard.learn({"A": (3, 0), "B": (7, 1)})
    assert guard.check(envelope("A", 5)) == -1  # its own v5, not the store's v3
    assert guard.check(envelope("B", 7)) == -1
    assert guard.dirty == {"A": (5, 0)}  # only what it handled is written back
    guard.forget({1})
    assert guard.check(envelope("B", 7)) == 0  # B's partition went: taken as it comes
    assert guard.check(envelope("A", 5)) == -1


class _Engine:
    """What VersionStore uses of an engine: its writes can be made to fail."""

    group = "g"
    dead_letter_topic = "t.dlq"

    def __init__(self) -> None:
        self.fail = False
        self.written: list[tuple[str, bytes]] = []
        self.committed: list[int] = []

    async def publish_internal(
        self, topic: str, value: bytes, key: str | None, headers: dict[str, bytes]
    ) -> None:
        if self.fail:
            raise keybus.PublishError("t.dlq.versions", "refused")
        assert key is not None
        self.written.append((key, value))

    def commit_now(self, message: Message) -> None:
        self.committed.append(message.offset)


async def test_a_commit_is_made_only_once_the_versions_before_it_are_stored() -> None:
    from keybus.versions import VersionStore

    engine = _Engine()
    guard = VersionGuard(10, persistent=True)
    store = VersionStore(engine, guard, read=None)  # type: ignore[arg-type]  # a fake engine
    guard.handled(envelope("A", 1), 0)
    store.hold(Message("t", b"", "A", {}, 0, 0))
    engine.fail = True
    with pytest.raises(keybus.PublishError):
        await store.flush()
    assert engine.committed == []  # not stored: not committed
    guard.handled(envelope("A", 2), 0)  # newer than the one that failed to be written
    store.hold(Message("t", b"", "A", {}, 0, 1))
    engine.fail = False
    await store.flush()
    assert engine.written == [("g/A", b'{"p":0,"v":2}')]
    assert engine.committed == [1]  # the latest held commit of the partition
    await store.flush()  # nothing new: nothing written, nothing committed
    assert (len(engine.written), engine.committed) == (1, [1])
