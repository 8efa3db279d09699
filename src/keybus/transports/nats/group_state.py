"""A group's members and partition claims, how this member sees which of them are alive,
the changes a rebalance round makes, and the compare-and-set that writes them — all
without a server.

One key-value entry per (topic, group) holds the state. Its wire format is the one
earlier keybus versions read and write, so they can share a group::

    {"m": {member: [joined, renewal]}, "o": {"3": [member, renewal]}}

* ``joined`` orders the members (partition ``p`` is desired by the ``p % n``-th). This
  version writes a join sequence number — one more than the highest in the entry —
  instead of the wall-clock time earlier versions wrote: only the order matters.
* ``renewal`` is a token its member changes every time it renews. This version writes
  its own ``time.time() + lease_ttl``, made strictly increasing, so that earlier
  versions, which read it as a wall-clock expiry, still understand it — but it never
  compares the number with any clock. **No decision compares one member's clock with
  another's**: a member (or claim) of someone else is alive as long as this member has
  seen its entry change within ``lease_ttl`` on its own monotonic clock
  (:class:`Sightings`). A member whose entry stopped changing is gone for us ``lease_ttl``
  after we first saw that entry, which is at least ``lease_ttl`` after its member last
  renewed it — while that member stops acting on its claims ``lease_ttl - heartbeat``
  after it sent that renewal. (Only a group that still has members of an earlier version
  depends on their clocks, for their decisions.)

An entry may have been written by something else (or by hand): parsing keeps only
well-formed members and claims and never raises, and the next write repairs the rest.

Every change is made by :func:`compare_and_set`: read the entry and its revision, apply
a pure change, write it only if the revision is still the one read — retried on a
conflict — so no member ever acts on a stale view. It is written against
:class:`GroupKV`, the three calls it needs of a key-value store. The revision of the
write that claimed a partition is the partition's fence (``Message.fence``): revisions
of the bucket only grow, so every change of owner gets a higher one.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Collection
from dataclasses import astuple, dataclass, field
from typing import Generic, Protocol, TypeVar

from keybus.partitioning import assign_partitions

__all__ = [
    "Claim",
    "Conflict",
    "GroupKV",
    "GroupState",
    "MemberLease",
    "RoundClaims",
    "Sightings",
    "Written",
    "compare_and_set",
    "next_renewal",
    "read",
]

T = TypeVar("T")
K = TypeVar("K")
E = TypeVar("E")

CAS_ATTEMPTS = 20
"""Conflicts in a row before a write gives up (``TimeoutError``; the round is retried at
the next heartbeat). Each retry first waits a random moment of up to 5 ms times the attempts, so
members writing at once spread out."""

RENEWAL_STEP = 0.001
"""The least a member's renewal token grows by, whatever its wall clock does."""


class Conflict(Exception):
    """The entry changed since it was read (or exists already, for a create)."""


class GroupKV(Protocol):
    """What :func:`compare_and_set` needs of a key-value store."""

    async def get(self, key: str) -> tuple[bytes | None, int | None]:
        """``(value, revision)``; ``(None, None)`` if there is no entry."""

    async def create(self, key: str, value: bytes) -> int:
        """Write a new entry and return its revision; :class:`Conflict` if one exists."""

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Overwrite the entry if its revision is still ``last`` and return the new
        revision; else :class:`Conflict`."""


@dataclass(slots=True)
class MemberLease:
    """A member: its place in the join order, and its renewal token (changed by the
    member at every renewal)."""

    joined: float
    renewal: float


@dataclass(slots=True)
class Claim:
    """A partition's owner, and the owner's renewal token as of its last renewal."""

    member: str
    renewal: float


@dataclass(slots=True)
class RoundClaims:
    """What a round's write found: partitions we hold that are no longer ours — another
    member claims them, or our claim is gone (others saw us silent for a lease and
    dropped it) — which must be given up at once (``stolen``), and free ones we now claim
    (``taken``)."""

    stolen: list[int] = field(default_factory=list)
    taken: list[int] = field(default_factory=list)


def next_renewal(previous: float, ttl: float, wall: Callable[[], float] = time.time) -> float:
    """The renewal token to write after ``previous``: the wall-clock expiry earlier keybus
    versions expect (``wall() + ttl``), but always greater than ``previous`` — a token
    must change at every renewal, even if the wall clock stands still or steps back."""
    return max(wall() + ttl, previous + RENEWAL_STEP)


@dataclass(slots=True)
class GroupState:
    """One group's members (in the entry's order) and partition owners."""

    members: dict[str, MemberLease] = field(default_factory=dict)
    owners: dict[int, Claim] = field(default_factory=dict)

    # -- the entry ---------------------------------------------------------------------

    @classmethod
    def parse(cls, value: bytes | None) -> GroupState:
        """The state in ``value``: every well-formed member and claim (which of them are
        alive is :class:`Sightings`' business). Never raises."""
        state = cls()
        try:
            raw = json.loads(value or b"{}")
        except (ValueError, RecursionError):  # not JSON (or not UTF-8), or absurdly deep
            return state
        if not isinstance(raw, dict):
            return state
        members = raw.get("m")
        if isinstance(members, dict):
            for member, lease in members.items():
                if _pair(lease) and _is_number(lease[0]) and _is_number(lease[1]):
                    state.members[member] = MemberLease(lease[0], lease[1])
        owners = raw.get("o")
        if isinstance(owners, dict):
            for partition, claim in owners.items():
                if (
                    partition.isascii()
                    and partition.isdigit()
                    and _pair(claim)
                    and isinstance(claim[0], str)
                    and _is_number(claim[1])
                ):
                    state.owners[int(partition)] = Claim(claim[0], claim[1])
        return state

    def encode(self) -> bytes:
        return json.dumps(
            {
                "m": {m: [lease.joined, lease.renewal] for m, lease in self.members.items()},
                "o": {str(p): [claim.member, claim.renewal] for p, claim in self.owners.items()},
            }
        ).encode()

    # -- reading -----------------------------------------------------------------------

    def desired(self, partitions: int) -> dict[int, str]:
        """Each partition's desired owner: round-robin over the members in join order
        (ties broken by id), so every member computes the same answer."""
        members = self.members
        order = sorted(members, key=lambda m: (members[m].joined, m))
        return assign_partitions(order, partitions)

    def not_ours(self, me: str, held: Collection[int]) -> list[int]:
        """The partitions of ``held`` that are not ``me``'s any more: another member
        claims them, or nobody does (our claim was dropped by a member that saw us
        silent for a lease). Only ``me`` ever writes its claims, so one that is still
        there has been ours without a break."""
        owners = self.owners
        return [p for p in held if (claim := owners.get(p)) is None or claim.member != me]

    def next_join(self) -> float:
        """The join sequence number of a member joining now: after everyone present."""
        return max((lease.joined for lease in self.members.values()), default=0) + 1

    # -- changes -----------------------------------------------------------------------

    def join(self, me: str, renewal: float) -> None:
        """Join at the end of the join order, or renew the membership (its place in the
        order stays)."""
        lease = self.members.get(me)
        self.members[me] = MemberLease(lease.joined if lease else self.next_join(), renewal)

    def leave(self, me: str) -> None:
        self.members.pop(me, None)

    def renew(self, me: str, renewal: float) -> list[int]:
        """Extend the membership (if still a member) and every claim of ``me``; returns
        the partitions ``me`` still claims (ownership of the others is not renewed)."""
        lease = self.members.get(me)
        if lease is not None:
            lease.renewal = renewal
        claimed = []
        for partition, claim in self.owners.items():
            if claim.member == me:
                claim.renewal = renewal
                claimed.append(partition)
        return claimed

    def drop_claims_not_held(self, me: str, held: Collection[int]) -> None:
        """Remove the claims of ``me`` on partitions it no longer holds (given up before
        this write)."""
        owners = self.owners
        for partition in [p for p, claim in owners.items() if claim.member == me]:
            if partition not in held:
                del owners[partition]

    def claim_held(self, me: str, held: Collection[int], renewal: float) -> list[int]:
        """Renew the claims on the partitions ``me`` holds; returns those that are not
        ``me``'s any more (:meth:`not_ours`: not renewed, and not claimed again here — the
        partition may have had another owner meanwhile, so it is given up and taken
        afresh)."""
        stolen = self.not_ours(me, held)
        for partition in held:
            if partition not in stolen:
                self.owners[partition] = Claim(me, renewal)
        return stolen

    def claim_desired(
        self, me: str, partitions: int, renewal: float, held: Collection[int] = ()
    ) -> list[int]:
        """Claim the free partitions desired by ``me`` (but not those it still holds:
        one whose claim is gone is given up first); returns them."""
        owners = self.owners
        taken = [
            p
            for p, member in self.desired(partitions).items()
            if member == me and p not in owners and p not in held
        ]
        for partition in taken:
            owners[partition] = Claim(me, renewal)
        return taken

    def write_round(
        self,
        me: str,
        *,
        renewal: float,
        held: Collection[int],
        partitions: int,
        leaving: bool,
        taking: bool,
    ) -> RoundClaims:
        """The change one rebalance round writes: join/renew (or leave), drop the claims
        on what ``me`` gave up, renew those on what it holds, and — when ``taking`` —
        claim the free partitions it is desired for."""
        if leaving:
            self.leave(me)
        else:
            self.join(me, renewal)
        self.drop_claims_not_held(me, held)
        stolen = self.claim_held(me, held, renewal)
        taken = self.claim_desired(me, partitions, renewal, held) if taking else []
        return RoundClaims(stolen, taken)


def _pair(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- who is alive ------------------------------------------------------------------------


class Sightings:
    """When this member (``me``) first saw each other member's and each claim's entry as
    it is now, on its own monotonic clock (``clock``), and so which of them are alive: an
    entry unchanged for ``ttl`` since we first saw it is gone. Our own entries are never
    dropped here (we know whether we are alive; :meth:`GroupState.not_ours` tells us
    whether others dropped our claims).

    The moment noted is when the read that showed the entry *returned*: its member wrote
    it before that, so it never makes a silent member look younger than it is."""

    def __init__(self, me: str, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.me = me
        self.ttl = ttl
        self._clock = clock
        # member -> ((joined, renewal), first seen); partition -> ((member, renewal), ...)
        self._members: dict[str, tuple[tuple[object, ...], float]] = {}
        self._claims: dict[int, tuple[tuple[object, ...], float]] = {}

    def view(self, value: bytes | None) -> GroupState:
        """The state in ``value`` as this member sees it: every member and claim of
        someone else that has not been silent for ``ttl``."""
        state = GroupState.parse(value)
        now = self._clock()
        self._members = self._prune(state.members, self._members, lambda m, _: m, now)
        self._claims = self._prune(state.owners, self._claims, lambda _, c: c.member, now)
        return state

    def _prune(
        self,
        entries: dict[K, E],
        seen: dict[K, tuple[tuple[object, ...], float]],
        owner: Callable[[K, E], str],
        now: float,
    ) -> dict[K, tuple[tuple[object, ...], float]]:
        """Drop from ``entries`` those of others unchanged for ``ttl`` since we first saw
        them so; returns the sightings to keep (entries no longer there are forgotten:
        should one come back, it is new to us)."""
        noted: dict[K, tuple[tuple[object, ...], float]] = {}
        for key, entry in list(entries.items()):
            if owner(key, entry) == self.me:
                continue
            token = astuple(entry)  # type: ignore[call-overload]
            before = seen.get(key)
            since = before[1] if before is not None and before[0] == token else now
            noted[key] = (token, since)
            if now - since >= self.ttl:
                del entries[key]
        return noted


# -- compare-and-set -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Written(Generic[T]):
    """A successful write: the state as written, what the change returned, when
    (``time.monotonic()``) the write that succeeded was sent — the renewals it wrote
    are seen by others no earlier than that — and the entry's revision it made."""

    state: GroupState
    outcome: T
    sent: float
    revision: int


async def read(kv: GroupKV, key: str, sightings: Sightings) -> tuple[GroupState, int | None]:
    """The state under ``key`` as ``sightings`` sees it, and its revision (``None``: no
    entry yet)."""
    value, revision = await kv.get(key)
    return sightings.view(value), revision


async def compare_and_set(
    kv: GroupKV,
    key: str,
    change: Callable[[GroupState], T],
    sightings: Sightings,
    clock: Callable[[], float] = time.monotonic,
) -> Written[T]:
    """Read, apply ``change(state)``, write if nobody wrote in between; on a conflict,
    read again and re-apply. ``TimeoutError`` after :data:`CAS_ATTEMPTS`."""
    for attempt in range(CAS_ATTEMPTS):
        state, revision = await read(kv, key, sightings)
        outcome = change(state)
        value = state.encode()
        sent = clock()
        try:
            if revision is None:
                written = await kv.create(key, value)
            else:
                written = await kv.update(key, value, last=revision)
        except Conflict:
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
            continue
        return Written(state, outcome, sent, written)
    raise TimeoutError("group state kept changing")
