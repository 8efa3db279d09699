"""The NATS group state (``keybus.transports.nats.group_state``), without a server: the
wire format other keybus versions read and write, tolerant parsing of entries someone
else wrote, the changes a rebalance round makes, and the compare-and-set loop retrying
on a conflict against a fake key-value store."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keybus.transports.nats import group_state
from keybus.transports.nats.group_state import (
    Claim,
    Conflict,
    GroupState,
    MemberLease,
    RoundClaims,
    compare_and_set,
    read,
)

NOW = 1_000_000.0
LATER = NOW + 6.0
KEY = "topic.group"


class FakeKV:
    """A key-value store with revisions, as JetStream's: ``create`` fails if the entry
    exists, ``update`` if its revision moved. ``meddle`` runs once after every read, as
    another member writing between our read and our write."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[bytes, int]] = {}
        self.revision = 0
        self.conflicts = 0
        self.meddle: Callable[[], None] | None = None

    def put(self, key: str, value: bytes) -> None:
        self.revision += 1
        self.entries[key] = (value, self.revision)

    async def get(self, key: str) -> tuple[bytes | None, int | None]:
        found = self.entries.get(key)
        if self.meddle is not None:
            self.meddle()
        return found if found is not None else (None, None)

    async def create(self, key: str, value: bytes) -> None:
        if key in self.entries:
            self.conflicts += 1
            raise Conflict(key)
        self.put(key, value)

    async def update(self, key: str, value: bytes, last: int) -> None:
        if self.entries[key][1] != last:
            self.conflicts += 1
            raise Conflict(key)
        self.put(key, value)

    def state(self, now: float = NOW) -> GroupState:
        return GroupState.parse(self.entries[KEY][0], now)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry's random pause is a real sleep; zero keeps these tests instant."""
    monkeypatch.setattr(group_state.random, "uniform", lambda a, b: 0.0)


# -- the wire format --------------------------------------------------------------------


def test_an_entry_another_keybus_version_wrote_is_read_and_written_back_unchanged() -> None:
    wire = (
        b'{"m": {"b7": [5.5, 1000003.25], "a1": [3, 1000004]}, '
        b'"o": {"0": ["b7", 1000003.25], "2": ["a1", 1000004]}}'
    )
    state = GroupState.parse(wire, NOW)
    assert state.members == {"b7": MemberLease(5.5, 1000003.25), "a1": MemberLease(3, 1000004)}
    assert state.owners == {0: Claim("b7", 1000003.25), 2: Claim("a1", 1000004)}
    assert state.encode() == wire


def test_encode_writes_the_shape_every_member_reads() -> None:
    state = GroupState()
    state.join("m1", 1.0, LATER)
    state.owners[3] = Claim("m1", LATER)
    assert json.loads(state.encode()) == {"m": {"m1": [1.0, LATER]}, "o": {"3": ["m1", LATER]}}


def test_expired_members_and_claims_are_dropped_when_read() -> None:
    members = {"old": [1, NOW - 1], "new": [2, LATER]}
    wire = json.dumps({"m": members, "o": {"0": ["old", NOW], "1": ["new", LATER]}}).encode()
    state = GroupState.parse(wire, NOW)
    assert list(state.members) == ["new"]
    assert state.owners == {1: Claim("new", LATER)}


@pytest.mark.parametrize(
    "junk",
    [
        None,
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b"null",
        b'"m"',
        b"[" * 100_000,
        b'{"m": [], "o": "x"}',
        b'{"m": {"x": "y", "z": [1], "b": [true, 9e99], "n": [1, null]}}',
        b'{"o": {"zz": ["m", 9e99], "0": [1, 9e99], "1": ["m"], "-1": ["m", 9e99]}}',
        '{"o": {"\u00b2": ["m", 9e99], "\u0663": ["m", 9e99]}}'.encode(),
    ],
)
def test_malformed_entries_read_as_empty_and_never_raise(junk: bytes | None) -> None:
    assert GroupState.parse(junk, NOW) == GroupState()


def test_partition_numbers_are_normalised() -> None:
    state = GroupState.parse(b'{"o": {"03": ["m", 9e99]}}', NOW)
    assert state.owners == {3: Claim("m", 9e99)}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from(["m", "o", "x"]), json_values) | json_values)
def test_any_json_parses_to_a_state_that_encodes(raw: Any) -> None:
    state = GroupState.parse(json.dumps(raw).encode(), NOW)
    assert GroupState.parse(state.encode(), NOW) == state


@given(st.binary(max_size=64))
def test_any_bytes_parse(raw: bytes) -> None:
    GroupState.parse(raw, NOW)


# -- what a round changes ----------------------------------------------------------------


def test_partitions_are_desired_round_robin_in_join_order_ties_by_id() -> None:
    state = GroupState()
    state.join("late", 20.0, LATER)
    state.join("b-early", 10.0, LATER)
    state.join("a-early", 10.0, LATER)
    assert state.desired(4) == {0: "a-early", 1: "b-early", 2: "late", 3: "a-early"}
    assert GroupState().desired(4) == {}


def test_a_joining_member_claims_only_free_partitions_it_is_desired_for() -> None:
    state = GroupState()
    state.join("a", 1.0, LATER)
    state.owners = {0: Claim("a", LATER), 1: Claim("a", LATER)}
    claims = state.write_round(
        "b", joined=2.0, expires=LATER, held=(), partitions=2, leaving=False, taking=True
    )
    assert claims == RoundClaims(stolen=[], taken=[])  # partition 1 is b's, but a holds it
    assert "b" in state.members
    del state.owners[1]  # a gave it up
    claims = state.write_round(
        "b", joined=2.0, expires=LATER, held=(), partitions=2, leaving=False, taking=True
    )
    assert claims.taken == [1]
    assert state.owners == {0: Claim("a", LATER), 1: Claim("b", LATER)}


def test_a_round_renews_what_it_holds_drops_what_it_gave_up_and_reports_what_was_stolen() -> None:
    state = GroupState()
    state.join("a", 1.0, NOW + 1)
    state.owners = {0: Claim("a", NOW + 1), 1: Claim("a", NOW + 1), 2: Claim("x", NOW + 1)}
    claims = state.write_round(
        "a", joined=1.0, expires=LATER, held={0, 2, 3}, partitions=4, leaving=False, taking=False
    )
    assert claims == RoundClaims(stolen=[2], taken=[])
    assert state.members == {"a": MemberLease(1.0, LATER)}
    # 1 was given up: its claim goes; 2 is x's: untouched; 3 was held unclaimed: claimed.
    assert state.owners == {0: Claim("a", LATER), 2: Claim("x", NOW + 1), 3: Claim("a", LATER)}


def test_a_member_stopping_keeps_its_claims_but_takes_nothing_new() -> None:
    state = GroupState()
    claims = state.write_round(
        "a", joined=1.0, expires=LATER, held={0}, partitions=3, leaving=False, taking=False
    )
    assert claims == RoundClaims([], [])
    assert state.owners == {0: Claim("a", LATER)}


def test_leaving_removes_the_member_and_its_claims() -> None:
    state = GroupState()
    state.join("a", 1.0, LATER)
    state.join("b", 2.0, LATER)
    state.owners = {0: Claim("a", LATER), 1: Claim("b", LATER)}
    claims = state.write_round(
        "a", joined=1.0, expires=LATER, held=(), partitions=2, leaving=True, taking=False
    )
    assert claims == RoundClaims([], [])
    assert list(state.members) == ["b"]
    assert state.owners == {1: Claim("b", LATER)}


def test_renewing_extends_only_the_members_own_lease_and_claims() -> None:
    state = GroupState()
    state.join("a", 1.0, NOW + 1)
    state.join("b", 2.0, NOW + 1)
    state.owners = {0: Claim("a", NOW + 1), 1: Claim("b", NOW + 1)}
    state.renew("a", LATER)
    assert state.members == {"a": MemberLease(1.0, LATER), "b": MemberLease(2.0, NOW + 1)}
    assert state.owners == {0: Claim("a", LATER), 1: Claim("b", NOW + 1)}
    state.renew("gone", LATER)  # not a member: nothing to renew, nothing added
    assert "gone" not in state.members


def test_claimed_by_others_names_held_partitions_someone_else_claims() -> None:
    state = GroupState(owners={0: Claim("a", LATER), 1: Claim("b", LATER)})
    assert state.claimed_by_others("a", [0, 1, 2]) == [1]


# -- compare-and-set ---------------------------------------------------------------------


async def test_the_first_write_creates_the_entry() -> None:
    kv = FakeKV()
    written = await compare_and_set(kv, KEY, lambda s, now: s.join("a", 1.0, now + 6))
    assert kv.revision == 1
    assert list(written.state.members) == ["a"]
    assert kv.state() == written.state


async def test_a_conflicting_write_is_retried_on_the_fresh_state() -> None:
    """Another member writes between our read and our write: our update is refused, and
    the change is applied again to what the other wrote — nothing of theirs is lost."""
    kv = FakeKV()
    kv.put(KEY, b'{"m": {"a": [1.0, 9e99]}, "o": {}}')
    other = GroupState.parse(kv.entries[KEY][0], NOW)
    other.join("b", 0.5, 9e99)  # joined first: partition 0 is b's, 1 is a's
    other.owners[0] = Claim("b", 9e99)
    meddled: list[int] = []

    def meddle() -> None:
        if not meddled:
            meddled.append(1)
            kv.put(KEY, other.encode())

    kv.meddle = meddle
    applied: list[GroupState] = []

    def change(state: GroupState, now: float) -> RoundClaims:
        applied.append(state)
        return state.write_round(
            "a", joined=1.0, expires=now + 6, held=(), partitions=2, leaving=False, taking=True
        )

    written = await compare_and_set(kv, KEY, change, clock=lambda: NOW)
    assert kv.conflicts == 1
    assert len(applied) == 2, "read and applied again after the conflict"
    assert written.outcome == RoundClaims(stolen=[], taken=[1]), "0 is b's now"
    assert kv.state() == written.state
    assert written.state.owners == {0: Claim("b", 9e99), 1: Claim("a", NOW + 6)}


async def test_two_members_creating_the_entry_at_once_both_get_in() -> None:
    kv = FakeKV()

    def first_get_then_someone_creates() -> None:
        kv.meddle = None
        kv.put(KEY, b'{"m": {"b": [2.0, 9e99]}, "o": {}}')

    kv.meddle = first_get_then_someone_creates
    written = await compare_and_set(kv, KEY, lambda s, now: s.join("a", 1.0, 9e99))
    assert kv.conflicts == 1
    assert set(written.state.members) == {"a", "b"}


async def test_a_state_that_keeps_changing_gives_up_with_a_timeout() -> None:
    kv = FakeKV()
    kv.put(KEY, b"{}")
    kv.meddle = lambda: kv.put(KEY, b"{}")  # every read is stale by the time we write
    with pytest.raises(TimeoutError):
        await compare_and_set(kv, KEY, lambda s, now: None)
    assert kv.conflicts == group_state.CAS_ATTEMPTS


async def test_written_records_when_the_successful_attempt_began() -> None:
    """Leases are counted from the read of the attempt that succeeded, not the first."""
    kv = FakeKV()
    kv.put(KEY, b"{}")
    reads: list[float] = []

    def meddle() -> None:
        reads.append(time.monotonic())
        if len(reads) == 1:
            kv.put(KEY, b"{}")

    kv.meddle = meddle
    written = await compare_and_set(kv, KEY, lambda s, now: None)
    assert len(reads) == 2
    assert reads[0] <= written.began <= reads[1]


async def test_read_gives_the_state_and_revision() -> None:
    kv = FakeKV()
    assert await read(kv, KEY) == (GroupState(), None)
    kv.put(KEY, b'{"m": {"a": [1, 9e99]}}')
    state, revision = await read(kv, KEY)
    assert (list(state.members), revision) == (["a"], 1)


async def test_members_rounds_converge_to_one_owner_per_partition() -> None:
    """Three members run rounds against one entry in turn, each giving up what it is no
    longer desired for before the next write (as GroupMember does): every partition ends
    with its desired owner, and no partition is ever claimed by two."""
    kv = FakeKV()
    held: dict[str, set[int]] = {"a": set(), "b": set(), "c": set()}
    joined = {"a": 1.0, "b": 2.0, "c": 3.0}
    for _ in range(4):
        for me in held:
            state, _ = await read(kv, KEY, clock=lambda: NOW)
            state.join(me, joined[me], LATER)
            desired = state.desired(5)
            held[me] = {p for p in held[me] if desired.get(p) == me}  # released

            def change(state: GroupState, now: float, me: str = me) -> RoundClaims:
                return state.write_round(
                    me,
                    joined=joined[me],
                    expires=LATER,
                    held=held[me],
                    partitions=5,
                    leaving=False,
                    taking=True,
                )

            written = await compare_and_set(kv, KEY, change, clock=lambda: NOW)
            held[me] |= set(written.outcome.taken)
            owners = [p for ps in held.values() for p in ps]
            assert len(owners) == len(set(owners)), f"a partition with two owners: {held}"
    assert held == {"a": {0, 3}, "b": {1, 4}, "c": {2}}
