"""The NATS group state (``keybus.transports.nats.group_state``), without a server: the
wire format other keybus versions read and write, tolerant parsing of entries someone
else wrote, who is alive as one member sees it on its own monotonic clock (never by
comparing wall clocks), the changes a rebalance round makes, and the compare-and-set loop
retrying on a conflict against a fake key-value store."""

from __future__ import annotations

import itertools
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
    Sightings,
    compare_and_set,
    next_renewal,
    read,
)

NOW = 1_000_000.0
LATER = NOW + 6.0
TTL = 6.0
KEY = "topic.group"


class FakeKV:
    """A key-value store with revisions, as JetStream's: ``create`` fails if the entry
    exists, ``update`` if its revision moved; both return the new revision. ``meddle``
    runs once after every read, as another member writing between our read and our
    write."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[bytes, int]] = {}
        self.revision = 0
        self.conflicts = 0
        self.meddle: Callable[[], None] | None = None

    def put(self, key: str, value: bytes) -> int:
        self.revision += 1
        self.entries[key] = (value, self.revision)
        return self.revision

    async def get(self, key: str) -> tuple[bytes | None, int | None]:
        found = self.entries.get(key)
        if self.meddle is not None:
            self.meddle()
        return found if found is not None else (None, None)

    async def create(self, key: str, value: bytes) -> int:
        if key in self.entries:
            self.conflicts += 1
            raise Conflict(key)
        return self.put(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        if self.entries[key][1] != last:
            self.conflicts += 1
            raise Conflict(key)
        return self.put(key, value)

    def state(self) -> GroupState:
        return GroupState.parse(self.entries[KEY][0])


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sightings(me: str = "me", clock: Callable[[], float] | None = None) -> Sightings:
    return Sightings(me, TTL, clock or Clock())


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry's random pause is a real sleep; zero keeps these tests instant."""
    monkeypatch.setattr(group_state.random, "uniform", lambda a, b: 0.0)


# -- the wire format --------------------------------------------------------------------


def test_an_entry_another_keybus_version_wrote_is_read_and_written_back_unchanged() -> None:
    """The format is the one earlier versions write ([joined, wall-clock expiry] pairs),
    so members of both versions can share a group."""
    wire = (
        b'{"m": {"b7": [5.5, 1000003.25], "a1": [3, 1000004]}, '
        b'"o": {"0": ["b7", 1000003.25], "2": ["a1", 1000004]}}'
    )
    state = GroupState.parse(wire)
    assert state.members == {"b7": MemberLease(5.5, 1000003.25), "a1": MemberLease(3, 1000004)}
    assert state.owners == {0: Claim("b7", 1000003.25), 2: Claim("a1", 1000004)}
    assert state.encode() == wire


def test_encode_writes_the_shape_every_member_reads() -> None:
    state = GroupState()
    state.join("m1", LATER)
    state.owners[3] = Claim("m1", LATER)
    assert json.loads(state.encode()) == {"m": {"m1": [1, LATER]}, "o": {"3": ["m1", LATER]}}


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
    assert GroupState.parse(junk) == GroupState()
    assert sightings().view(junk) == GroupState()


def test_partition_numbers_are_normalised() -> None:
    state = GroupState.parse(b'{"o": {"03": ["m", 9e99]}}')
    assert state.owners == {3: Claim("m", 9e99)}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from(["m", "o", "x"]), json_values) | json_values)
def test_any_json_parses_to_a_state_that_encodes(raw: Any) -> None:
    state = GroupState.parse(json.dumps(raw).encode())
    assert GroupState.parse(state.encode()) == state


@given(st.binary(max_size=64))
def test_any_bytes_parse(raw: bytes) -> None:
    GroupState.parse(raw)
    sightings().view(raw)


# -- who is alive: our own clock, never another member's -----------------------------------


def entry(members: dict[str, list[float]], owners: dict[str, list[Any]]) -> bytes:
    return json.dumps({"m": members, "o": owners}).encode()


def test_a_member_and_its_claims_are_gone_a_lease_after_we_first_saw_them_unchanged() -> None:
    clock = Clock()
    seen = sightings(clock=clock)
    wire = entry({"a": [1, 5.0]}, {"0": ["a", 5.0]})
    assert list(seen.view(wire).members) == ["a"]
    clock.now += TTL - 0.01
    state = seen.view(wire)
    assert (list(state.members), list(state.owners)) == (["a"], [0]), "not yet a lease"
    clock.now += 0.01
    state = seen.view(wire)
    assert state == GroupState(), "silent for a lease: gone"


def test_every_renewal_starts_the_lease_again_whatever_its_number_says() -> None:
    """The renewal token is only compared with itself: a member whose wall clock is far
    behind (tokens in our past) or far ahead stays alive as long as its token changes, and
    a token from the far future does not keep a silent member alive."""
    clock = Clock()
    seen = sightings(clock=clock)
    for step in range(10):
        behind = entry({"slow": [1, 1.0 + step]}, {"0": ["slow", 1.0 + step]})
        state = seen.view(behind)
        assert list(state.members) == ["slow"]
        assert list(state.owners) == [0]
        clock.now += TTL * 0.9
    ahead = entry({"fast": [2, 9e15]}, {"1": ["fast", 9e15]})
    assert list(seen.view(ahead).members) == ["fast"]
    clock.now += TTL
    assert seen.view(ahead) == GroupState(), "a future token keeps no silent member alive"


def test_a_changed_claim_is_a_new_claim() -> None:
    """A partition that changed owner (or was renewed) counts from when we saw it so."""
    clock = Clock()
    seen = sightings(clock=clock)
    seen.view(entry({}, {"0": ["a", 1.0]}))
    clock.now += TTL - 1
    seen.view(entry({}, {"0": ["b", 1.0]}))  # same token, another member: new
    clock.now += 2
    assert seen.view(entry({}, {"0": ["b", 1.0]})).owners == {0: Claim("b", 1.0)}


def test_an_entry_that_left_and_came_back_is_new() -> None:
    clock = Clock()
    seen = sightings(clock=clock)
    wire = entry({"a": [1, 5.0]}, {})
    seen.view(wire)
    clock.now += TTL - 1
    seen.view(entry({}, {}))  # gone for a read (say it left and rejoined as it was)
    clock.now += 2
    assert list(seen.view(wire).members) == ["a"]


def test_our_own_entries_are_never_dropped_by_our_own_view() -> None:
    clock = Clock()
    seen = sightings("me", clock=clock)
    wire = entry({"me": [1, 5.0]}, {"0": ["me", 5.0]})
    seen.view(wire)
    clock.now += 10 * TTL  # we were stalled: whether others dropped us shows in the entry
    state = seen.view(wire)
    assert list(state.members) == ["me"]
    assert state.owners == {0: Claim("me", 5.0)}


async def test_the_moment_noted_is_when_the_read_returned() -> None:
    """A read that took long (the write it shows may have landed at its very end) must
    not make the member that wrote it look silent for longer than it was."""
    clock = Clock()
    seen = sightings(clock=clock)
    kv = FakeKV()
    kv.put(KEY, entry({"a": [1, 5.0]}, {}))

    def slow_read() -> None:
        clock.now += TTL  # the reply took a lease to come back

    kv.meddle = slow_read
    state, _ = await read(kv, KEY, seen)
    assert list(state.members) == ["a"]
    kv.meddle = None
    clock.now += TTL - 0.01
    state, _ = await read(kv, KEY, seen)
    assert list(state.members) == ["a"], "counted from when the first read returned"


def test_renewal_tokens_always_change_even_when_the_wall_clock_stands_still_or_steps_back() -> None:
    walls = iter([50.0, 50.0, 40.0, 60.0])
    tokens = [0.0]
    for _ in range(4):
        tokens.append(next_renewal(tokens[-1], TTL, wall=lambda: next(walls)))
    assert tokens[1:3] == [56.0, 56.0 + group_state.RENEWAL_STEP]
    assert all(a < b for a, b in itertools.pairwise(tokens))
    assert tokens[-1] == 66.0, "the wall-clock expiry earlier versions read, when it is ahead"


# -- what a round changes ----------------------------------------------------------------


def test_partitions_are_desired_round_robin_in_join_order_ties_by_id() -> None:
    state = GroupState()
    state.members["late"] = MemberLease(20.0, LATER)
    state.members["b-early"] = MemberLease(10.0, LATER)
    state.members["a-early"] = MemberLease(10.0, LATER)
    assert state.desired(4) == {0: "a-early", 1: "b-early", 2: "late", 3: "a-early"}
    assert GroupState().desired(4) == {}


def test_members_join_in_sequence_after_everyone_present_and_keep_their_place() -> None:
    """The join order is a sequence number in the entry, not anyone's wall clock (an
    earlier version's wall-clock join time still orders before a later number)."""
    state = GroupState()
    state.join("a", LATER)
    state.join("b", LATER)
    state.join("a", LATER + 1)  # a renewal keeps a's place
    assert state.members == {"a": MemberLease(1, LATER + 1), "b": MemberLease(2, LATER)}
    state.members["old"] = MemberLease(1.7e9, LATER)  # an earlier version, joined by time
    state.join("c", LATER)
    assert state.members["c"].joined == 1.7e9 + 1
    assert [state.desired(4)[p] for p in range(4)] == ["a", "b", "old", "c"]


def test_a_joining_member_claims_only_free_partitions_it_is_desired_for() -> None:
    state = GroupState()
    state.join("a", LATER)
    state.owners = {0: Claim("a", LATER), 1: Claim("a", LATER)}
    claims = state.write_round(
        "b", renewal=LATER, held=(), partitions=2, leaving=False, taking=True
    )
    assert claims == RoundClaims(stolen=[], taken=[])  # partition 1 is b's, but a holds it
    assert "b" in state.members
    del state.owners[1]  # a gave it up
    claims = state.write_round(
        "b", renewal=LATER, held=(), partitions=2, leaving=False, taking=True
    )
    assert claims.taken == [1]
    assert state.owners == {0: Claim("a", LATER), 1: Claim("b", LATER)}


def test_a_round_renews_what_it_holds_drops_what_it_gave_up_and_reports_what_is_lost() -> None:
    state = GroupState()
    state.join("a", NOW + 1)
    state.owners = {0: Claim("a", NOW + 1), 1: Claim("a", NOW + 1), 2: Claim("x", NOW + 1)}
    claims = state.write_round(
        "a", renewal=LATER, held={0, 2, 3}, partitions=4, leaving=False, taking=False
    )
    # 2 is x's; 3 is held but our claim on it is gone (others dropped it: we were silent
    # for a lease) — both must be given up, and 3 is not silently claimed again.
    assert claims == RoundClaims(stolen=[2, 3], taken=[])
    assert state.members == {"a": MemberLease(1, LATER)}
    # 1 was given up: its claim goes; 2 is x's: untouched; 3 stays unclaimed.
    assert state.owners == {0: Claim("a", LATER), 2: Claim("x", NOW + 1)}


def test_a_held_partition_whose_claim_was_dropped_is_not_taken_again_in_the_same_write() -> None:
    """It may have had another owner meanwhile: it is given up first (its handlers
    cancelled, its queued work dropped) and taken afresh by a later round."""
    state = GroupState()
    state.join("a", NOW)
    claims = state.write_round(
        "a", renewal=LATER, held={0}, partitions=1, leaving=False, taking=True
    )
    assert claims == RoundClaims(stolen=[0], taken=[])
    assert state.owners == {}
    claims = state.write_round(
        "a", renewal=LATER + 1, held=(), partitions=1, leaving=False, taking=True
    )
    assert claims.taken == [0]


def test_a_member_stopping_keeps_its_claims_but_takes_nothing_new() -> None:
    state = GroupState()
    state.join("a", NOW)
    state.owners = {0: Claim("a", NOW)}
    claims = state.write_round(
        "a", renewal=LATER, held={0}, partitions=3, leaving=False, taking=False
    )
    assert claims == RoundClaims([], [])
    assert state.owners == {0: Claim("a", LATER)}


def test_leaving_removes_the_member_and_its_claims() -> None:
    state = GroupState()
    state.join("a", LATER)
    state.join("b", LATER)
    state.owners = {0: Claim("a", LATER), 1: Claim("b", LATER)}
    claims = state.write_round(
        "a", renewal=LATER, held=(), partitions=2, leaving=True, taking=False
    )
    assert claims == RoundClaims([], [])
    assert list(state.members) == ["b"]
    assert state.owners == {1: Claim("b", LATER)}


def test_renewing_extends_only_the_members_own_lease_and_claims() -> None:
    state = GroupState()
    state.join("a", NOW + 1)
    state.join("b", NOW + 1)
    state.owners = {0: Claim("a", NOW + 1), 1: Claim("b", NOW + 1)}
    assert state.renew("a", LATER) == [0], "the partitions a still claims"
    assert state.members == {"a": MemberLease(1, LATER), "b": MemberLease(2, NOW + 1)}
    assert state.owners == {0: Claim("a", LATER), 1: Claim("b", NOW + 1)}
    assert state.renew("gone", LATER) == []  # not a member: nothing renewed, nothing added
    assert "gone" not in state.members


def test_not_ours_names_held_partitions_someone_else_or_nobody_claims() -> None:
    state = GroupState(owners={0: Claim("a", LATER), 1: Claim("b", LATER)})
    assert state.not_ours("a", [0, 1, 2]) == [1, 2]


# -- compare-and-set ---------------------------------------------------------------------


async def test_the_first_write_creates_the_entry() -> None:
    kv = FakeKV()
    written = await compare_and_set(kv, KEY, lambda s: s.join("a", LATER), sightings("a"))
    assert kv.revision == 1
    assert written.revision == 1
    assert list(written.state.members) == ["a"]
    assert kv.state() == written.state


async def test_a_conflicting_write_is_retried_on_the_fresh_state() -> None:
    """Another member writes between our read and our write: our update is refused, and
    the change is applied again to what the other wrote — nothing of theirs is lost."""
    kv = FakeKV()
    kv.put(KEY, b'{"m": {"a": [2, 9e99]}, "o": {}}')
    other = GroupState.parse(kv.entries[KEY][0])
    other.members["b"] = MemberLease(1, 9e99)  # joined first: partition 0 is b's, 1 is a's
    other.owners[0] = Claim("b", 9e99)
    meddled: list[int] = []

    def meddle() -> None:
        if not meddled:
            meddled.append(1)
            kv.put(KEY, other.encode())

    kv.meddle = meddle
    applied: list[GroupState] = []

    def change(state: GroupState) -> RoundClaims:
        applied.append(state)
        return state.write_round(
            "a", renewal=LATER, held=(), partitions=2, leaving=False, taking=True
        )

    written = await compare_and_set(kv, KEY, change, sightings("a"))
    assert kv.conflicts == 1
    assert len(applied) == 2, "read and applied again after the conflict"
    assert written.outcome == RoundClaims(stolen=[], taken=[1]), "0 is b's now"
    assert kv.state() == written.state
    assert written.state.owners == {0: Claim("b", 9e99), 1: Claim("a", LATER)}
    assert written.revision == kv.revision == 3


async def test_two_members_creating_the_entry_at_once_both_get_in() -> None:
    kv = FakeKV()

    def first_get_then_someone_creates() -> None:
        kv.meddle = None
        kv.put(KEY, b'{"m": {"b": [1, 9e99]}, "o": {}}')

    kv.meddle = first_get_then_someone_creates
    written = await compare_and_set(kv, KEY, lambda s: s.join("a", 9e99), sightings("a"))
    assert kv.conflicts == 1
    assert written.state.members == {"b": MemberLease(1, 9e99), "a": MemberLease(2, 9e99)}


async def test_a_state_that_keeps_changing_gives_up_with_a_timeout() -> None:
    kv = FakeKV()
    kv.put(KEY, b"{}")
    kv.meddle = lambda: kv.put(KEY, b"{}") and None  # every read is stale by the write
    with pytest.raises(TimeoutError):
        await compare_and_set(kv, KEY, lambda s: None, sightings())
    assert kv.conflicts == group_state.CAS_ATTEMPTS


async def test_written_records_when_the_successful_write_was_sent() -> None:
    """Our lease counts from just before the write that succeeded was sent: no other
    member can have seen its renewal earlier."""
    kv = FakeKV()
    kv.put(KEY, b"{}")
    reads: list[float] = []

    def meddle() -> None:
        reads.append(time.monotonic())
        if len(reads) == 1:
            kv.put(KEY, b"{}")

    kv.meddle = meddle
    written = await compare_and_set(kv, KEY, lambda s: None, sightings())
    assert len(reads) == 2
    assert reads[1] <= written.sent <= time.monotonic()


async def test_read_gives_the_state_and_revision() -> None:
    kv = FakeKV()
    assert await read(kv, KEY, sightings()) == (GroupState(), None)
    kv.put(KEY, b'{"m": {"a": [1, 9e99]}}')
    state, revision = await read(kv, KEY, sightings())
    assert (list(state.members), revision) == (["a"], 1)


async def test_members_rounds_converge_to_one_owner_per_partition() -> None:
    """Three members run rounds against one entry in turn, each giving up what it is no
    longer desired for before the next write (as GroupMember does): every partition ends
    with its desired owner, and no partition is ever claimed by two."""
    kv = FakeKV()
    held: dict[str, set[int]] = {"a": set(), "b": set(), "c": set()}
    views = {me: sightings(me) for me in held}
    renewal = dict.fromkeys(held, 0.0)
    for _ in range(4):
        for me in held:
            state, _ = await read(kv, KEY, views[me])
            state.join(me, 0.0)
            desired = state.desired(5)
            held[me] = {p for p in held[me] if desired.get(p) == me}  # released

            def change(state: GroupState, me: str = me) -> RoundClaims:
                renewal[me] = next_renewal(renewal[me], TTL)
                return state.write_round(
                    me,
                    renewal=renewal[me],
                    held=held[me],
                    partitions=5,
                    leaving=False,
                    taking=True,
                )

            written = await compare_and_set(kv, KEY, change, views[me])
            assert written.outcome.stolen == []
            held[me] |= set(written.outcome.taken)
            owners = [p for ps in held.values() for p in ps]
            assert len(owners) == len(set(owners)), f"a partition with two owners: {held}"
    assert held == {"a": {0, 3}, "b": {1, 4}, "c": {2}}
