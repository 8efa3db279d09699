"""The group-state bucket on the server: the JetStream key-value bucket
:data:`~keybus.transports.nats.names.GROUPS_BUCKET`, one entry per (topic, group), seen
through the small key-value protocol :mod:`.group_state` is written against."""

from __future__ import annotations

import contextlib

import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from keybus.transports.nats.group_state import Conflict
from keybus.transports.nats.names import GROUPS_BUCKET, GROUPS_STREAM, group_keys_subject

__all__ = ["GroupEntries", "forget_topic", "open_bucket"]


class GroupEntries:
    """The bucket as a :class:`~keybus.transports.nats.group_state.GroupKV` (plus purge)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, key: str) -> tuple[bytes | None, int | None]:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # also a deleted or purged entry
            return None, None
        return entry.value, entry.revision

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self._kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(key) from exc

    async def update(self, key: str, value: bytes, last: int) -> int:
        try:
            return await self._kv.update(key, value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(key) from exc

    async def purge(self, key: str) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._kv.purge(key)


async def open_bucket(js: JetStreamContext) -> GroupEntries:
    """The bucket, created on first use (file storage: group state survives restarts)."""
    try:
        kv = await js.key_value(GROUPS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        kv = await js.create_key_value(
            bucket=GROUPS_BUCKET, history=1, storage=api.StorageType.FILE
        )
    return GroupEntries(kv)


async def forget_topic(js: JetStreamContext, topic: str) -> None:
    """Drop the state of every group of ``topic`` (it was deleted)."""
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.purge_stream(GROUPS_STREAM, subject=group_keys_subject(topic))
