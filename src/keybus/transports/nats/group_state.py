"""A group's members and partition leases, the changes a rebalance round makes to them,
and the compare-and-set that writes them — all without a server.

One key-value entry per (topic, group) holds the state. Members of different keybus
versions may share a group, so its wire format stays exactly this::

    {"m": {member: [joined_at, lease_expires]}, "o": {"3": [member, lease_expires]}}

Times are wall-clock seconds (``time.time()``), compared across members: leases assume
roughly synchronised clocks. An entry may have been written by something else (or by
hand): parsing keeps only well-formed, unexpired members and claims, and the next write
repairs the rest.

Every change is made by :func:`compare_and_set`: read the entry and its revision, apply
a pure change, write it only if the revision is still the one read — retried on a
conflict — so no member ever acts on a stale view. It is written against
:class:`GroupKV`, the three calls it needs of a key-value store.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from keybus.partitioning import assign_partitions

__all__ = [
    "Claim",
    "Conflict",
    "GroupKV",
    "GroupState",
    "MemberLease",
    "RoundClaims",
    "Written",
    "compare_and_set",
    "read",
]

T = TypeVar("T")

CAS_ATTEMPTS = 20
"""Conflicts in a row before a write gives up (``TimeoutError``; the round is retried at
the next heartbeat). Each retry first waits a random moment of up to 5 ms times the attempts, so
members writing at once spread out."""


class Conflict(Exception):
    """The entry changed since it was read (or exists already, for a create)."""


class GroupKV(Protocol):
    """What :func:`compare_and_set` needs of a key-value store."""

    async def get(self, key: str) -> tuple[bytes | None, int | None]:
        """``(value, revision)``; ``(None, None)`` if there is no entry."""

    async def create(self, key: str, value: bytes) -> None:
        """Write a new entry; :class:`Conflict` if one exists."""

    async def update(self, key: str, value: bytes, last: int) -> None:
        """Overwrite the entry if its revision is still ``last``; else :class:`Conflict`."""


@dataclass(slots=True)
class MemberLease:
    """A live member: when it joined (its place in the join order) and until when it
    counts as alive."""

    joined: float
    expires: float


@dataclass(slots=True)
class Claim:
    """A partition's owner and until when its claim holds."""

    member: str
    expires: float


@dataclass(slots=True)
class RoundClaims:
    """What a round's write found: partitions we hold that another member claims
    (``stolen``: they must be given up at once) and free ones we now claim (``taken``)."""

    stolen: list[int] = field(default_factory=list)
    taken: list[int] = field(default_factory=list)


@dataclass(slots=True)
class GroupState:
    """One group's members (in the entry's order) and partition owners."""

    members: dict[str, MemberLease] = field(default_factory=dict)
    owners: dict[int, Claim] = field(default_factory=dict)

    # -- the entry ---------------------------------------------------------------------

    @classmethod
    def parse(cls, value: bytes | None, now: float) -> GroupState:
        """The state in ``value``, keeping only well-formed members and claims that have
        not expired at ``now``. Never raises."""
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
                if (
                    _pair(lease)
                    and _is_number(lease[0])
                    and _is_number(lease[1])
                    and lease[1] > now
                ):
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
                    and claim[1] > now
                ):
                    state.owners[int(partition)] = Claim(claim[0], claim[1])
        return state

    def encode(self) -> bytes:
        return json.dumps(
            {
                "m": {m: [lease.joined, lease.expires] for m, lease in self.members.items()},
                "o": {str(p): [claim.member, claim.expires] for p, claim in self.owners.items()},
            }
        ).encode()

    # -- reading -----------------------------------------------------------------------

    def desired(self, partitions: int) -> dict[int, str]:
        """Each partition's desired owner: round-robin over the members in join order
        (ties broken by id), so every member computes the same answer."""
        members = self.members
        order = sorted(members, key=lambda m: (members[m].joined, m))
        return assign_partitions(order, partitions)

    def claimed_by_others(self, me: str, held: Collection[int]) -> list[int]:
        """The partitions of ``held`` that another member claims."""
        owners = self.owners
        return [p for p in held if (claim := owners.get(p)) is not None and claim.member != me]

    # -- changes -----------------------------------------------------------------------

    def join(self, me: str, joined: float, expires: float) -> None:
        """Join, or renew the membership (its place in the join order stays ``joined``)."""
        self.members[me] = MemberLease(joined, expires)

    def leave(self, me: str) -> None:
        self.members.pop(me, None)

    def renew(self, me: str, expires: float) -> None:
        """Extend the membership (if still a member) and every claim of ``me``."""
        lease = self.members.get(me)
        if lease is not None:
            lease.expires = expires
        for claim in self.owners.values():
            if claim.member == me:
                claim.expires = expires

    def drop_claims_not_held(self, me: str, held: Collection[int]) -> None:
        """Remove the claims of ``me`` on partitions it no longer holds (given up before
        this write)."""
        owners = self.owners
        for partition in [p for p, claim in owners.items() if claim.member == me]:
            if partition not in held:
                del owners[partition]

    def claim_held(self, me: str, held: Collection[int], expires: float) -> list[int]:
        """Renew the claims on the partitions ``me`` holds; returns those another member
        claims meanwhile (stolen: not renewed)."""
        stolen = self.claimed_by_others(me, held)
        for partition in held:
            if partition not in stolen:
                self.owners[partition] = Claim(me, expires)
        return stolen

    def claim_desired(self, me: str, partitions: int, expires: float) -> list[int]:
        """Claim the free partitions desired by ``me``; returns them."""
        owners = self.owners
        taken = [
            p for p, member in self.desired(partitions).items() if member == me and p not in owners
        ]
        for partition in taken:
            owners[partition] = Claim(me, expires)
        return taken

    def write_round(
        self,
        me: str,
        *,
        joined: float,
        expires: float,
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
            self.join(me, joined, expires)
        self.drop_claims_not_held(me, held)
        stolen = self.claim_held(me, held, expires)
        taken = self.claim_desired(me, partitions, expires) if taking else []
        return RoundClaims(stolen, taken)


def _pair(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- compare-and-set -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Written(Generic[T]):
    """A successful write: the state as written, what the change returned, and when
    (``time.monotonic()``) the attempt that succeeded read the entry — the leases it
    wrote hold from no earlier than that."""

    state: GroupState
    outcome: T
    began: float


async def read(
    kv: GroupKV, key: str, clock: Callable[[], float] = time.time
) -> tuple[GroupState, int | None]:
    """The state under ``key`` and its revision (``None``: no entry yet)."""
    value, revision = await kv.get(key)
    return GroupState.parse(value, clock()), revision


async def compare_and_set(
    kv: GroupKV,
    key: str,
    change: Callable[[GroupState, float], T],
    clock: Callable[[], float] = time.time,
) -> Written[T]:
    """Read, apply ``change(state, now)``, write if nobody wrote in between; on a
    conflict, read again and re-apply. ``TimeoutError`` after :data:`CAS_ATTEMPTS`."""
    for attempt in range(CAS_ATTEMPTS):
        began = time.monotonic()
        state, revision = await read(kv, key, clock)
        outcome = change(state, clock())
        value = state.encode()
        try:
            if revision is None:
                await kv.create(key, value)
            else:
                await kv.update(key, value, last=revision)
        except Conflict:
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
            continue
        return Written(state, outcome, began)
    raise TimeoutError("group state kept changing")
