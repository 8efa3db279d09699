"""The domain-event envelope: fields, validation and the Go-compatible JSON wire format.

The codec sits on the hot path (every publish encodes, every envelope delivery decodes),
so it uses orjson directly and keeps the per-envelope work to one dict and one call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import uuid_utils

from keybus.errors import EnvelopeError

__all__ = ["Envelope", "envelope_headers"]

# The Go SDK's rule for aggregate ids: 1..256 characters of A-Za-z0-9:_-./
_AGGREGATE_ID = re.compile(r"[A-Za-z0-9:_\-./]{1,256}")
# RFC 3339 date-time: fractions up to nanoseconds, Z or any numeric offset.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)
_ENCODE_OPTIONS = orjson.OPT_UTC_Z
_INT64_MAX = 2**63 - 1  # the Go services decode these fields as int64


def _new_event_id() -> str:
    return str(uuid_utils.uuid7())


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One domain event. Immutable and valid by construction: invalid fields raise
    :class:`EnvelopeError` naming the field, so a constructed envelope can always be sent.

    ``payload`` is any JSON value; ``bytes`` are taken as raw JSON text and embedded as is.
    """

    aggregate_id: str
    event_type: str
    event_version: int
    payload: Any
    event_id: str = field(default_factory=_new_event_id)
    timestamp: datetime = field(default_factory=_utc_now)
    trace_id: str | None = None
    correlation_id: str | None = None
    tenant_id: int | None = None

    def __post_init__(self) -> None:
        _check_text("event_id", self.event_id)
        _check_text("event_type", self.event_type)
        aggregate_id = self.aggregate_id
        if type(aggregate_id) is not str or not _AGGREGATE_ID.fullmatch(aggregate_id):
            if type(aggregate_id) is str and not aggregate_id.strip():
                raise EnvelopeError("aggregate_id", "must not be blank")
            raise EnvelopeError(
                "aggregate_id", "must be 1 to 256 characters of A-Z a-z 0-9 : _ - . /"
            )
        version = self.event_version
        if type(version) is not int or not 0 < version <= _INT64_MAX:
            raise EnvelopeError("event_version", f"must be an integer > 0, got {version!r}")
        timestamp = self.timestamp
        if not isinstance(timestamp, datetime) or timestamp.utcoffset() is None:
            raise EnvelopeError("timestamp", "must be a timezone-aware datetime")
        payload = self.payload
        if payload is None:
            raise EnvelopeError("payload", "is required")
        if isinstance(payload, bytes | bytearray | memoryview):
            raw = bytes(payload)
            if not raw.strip():
                raise EnvelopeError("payload", "must not be empty")
            try:
                orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise EnvelopeError("payload", f"raw bytes are not valid JSON: {exc}") from None
            object.__setattr__(self, "payload", raw)
        for name in ("trace_id", "correlation_id"):
            value = getattr(self, name)
            if value is not None and type(value) is not str:
                raise EnvelopeError(name, "must be a string or None")
        tenant = self.tenant_id
        if tenant is not None and (type(tenant) is not int or abs(tenant) > _INT64_MAX):
            raise EnvelopeError("tenant_id", "must be a 64-bit integer or None")

    # -- wire format -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Encode as one JSON object with snake_case keys; unset optional keys are omitted."""
        payload = self.payload
        doc: dict[str, Any] = {
            "event_id": self.event_id,
            "aggregate_id": self.aggregate_id,
            "event_type": self.event_type,
            "event_version": self.event_version,
            "timestamp": self.timestamp,
            "payload": orjson.Fragment(payload) if type(payload) is bytes else payload,
        }
        if self.trace_id is not None:
            doc["trace_id"] = self.trace_id
        if self.correlation_id is not None:
            doc["correlation_id"] = self.correlation_id
        if self.tenant_id is not None:
            doc["tenant_id"] = self.tenant_id
        try:
            return orjson.dumps(doc, option=_ENCODE_OPTIONS)
        except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
            raise EnvelopeError("payload", f"not JSON-serialisable: {exc}") from None

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | str) -> Envelope:
        """Decode an envelope; any malformed input raises :class:`EnvelopeError`."""
        try:
            doc = orjson.loads(data)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise EnvelopeError("envelope", f"not valid JSON: {exc}") from None
        if type(doc) is not dict:
            raise EnvelopeError("envelope", f"expected a JSON object, got {type(doc).__name__}")
        return cls(
            aggregate_id=_required(doc, "aggregate_id"),
            event_type=_required(doc, "event_type"),
            event_version=_required(doc, "event_version"),
            payload=_required(doc, "payload"),
            event_id=_required(doc, "event_id"),
            timestamp=_parse_timestamp(_required(doc, "timestamp")),
            trace_id=_optional_text(doc, "trace_id"),
            correlation_id=_optional_text(doc, "correlation_id"),
            tenant_id=doc.get("tenant_id"),
        )

    def payload_json(self) -> bytes:
        """The payload as JSON text (raw bytes as given, or the encoded value)."""
        if type(self.payload) is bytes:
            return self.payload
        return orjson.dumps(self.payload)


def envelope_headers(envelope: Envelope) -> dict[str, bytes]:
    """Transport headers that let brokers and tools route or inspect without decoding."""
    headers = {
        "X-Event-ID": envelope.event_id.encode(),
        "X-Aggregate-ID": envelope.aggregate_id.encode(),
        "X-Event-Type": envelope.event_type.encode(),
        "X-Event-Version": str(envelope.event_version).encode(),
    }
    if envelope.trace_id is not None:
        headers["X-Trace-ID"] = envelope.trace_id.encode()
    if envelope.correlation_id is not None:
        headers["X-Correlation-ID"] = envelope.correlation_id.encode()
    return headers


def _check_text(name: str, value: object) -> None:
    if type(value) is not str:
        raise EnvelopeError(name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise EnvelopeError(name, "must not be blank")


def _required(doc: Mapping[str, Any], name: str) -> Any:
    value = doc.get(name)
    if value is None:
        raise EnvelopeError(name, "is required")
    return value


def _optional_text(doc: Mapping[str, Any], name: str) -> str | None:
    value = doc.get(name)
    # Go's encoding/json writes "" for an unset string without omitempty: treat it as unset.
    if value is None or value == "":
        return None
    if type(value) is not str:
        raise EnvelopeError(name, "must be a string")
    return value


def _parse_timestamp(value: object) -> datetime:
    if type(value) is not str or not _RFC3339.fullmatch(value):
        raise EnvelopeError("timestamp", f"must be an RFC 3339 date-time, got {value!r}")
    try:
        # fromisoformat keeps microseconds of a nanosecond fraction; upper() folds t/z.
        return datetime.fromisoformat(value.upper())
    except ValueError as exc:
        raise EnvelopeError("timestamp", f"invalid date-time {value!r}: {exc}") from None
