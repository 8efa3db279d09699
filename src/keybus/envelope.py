"""The domain-event envelope: fields, validation and the Go-compatible JSON wire format.

The codec sits on the hot path (every publish encodes, every envelope delivery decodes),
so the envelope is a msgspec Struct: encoding and typed decoding run in C, and the only
Python on the way is ``__post_init__`` with the rules msgspec cannot express.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import uuid_utils

from keybus.errors import EnvelopeError

__all__ = ["Envelope", "envelope_headers"]

# The Go SDK's rule for aggregate ids: 1..256 characters of A-Za-z0-9:_-./
_AGGREGATE_ID = re.compile(r"[A-Za-z0-9:_\-./]{1,256}")
_INT64_MAX = 2**63 - 1  # the Go services decode these fields as int64
_FIELD_IN_ERROR = re.compile(r"at `\$\.([a-z_]+)")
_force_setattr = msgspec.structs.force_setattr
# Aggregate ids that passed the regex (exact str only): a service sees the same aggregates
# over and over.
_VALID_AGGREGATES: set[str] = set()
_VALID_AGGREGATES_MAX = 65_536
_BYTES = (bytes, bytearray, memoryview)  # a tuple: `bytes | ...` would build a union per call


def _new_event_id() -> str:
    return str(uuid_utils.uuid7())


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One domain event. Immutable and valid by construction: invalid fields raise
    :class:`EnvelopeError` naming the field, so a constructed envelope can always be sent.

    ``payload`` is any JSON value; ``bytes`` are taken as raw JSON text and embedded as is
    (kept as :class:`msgspec.Raw`). ``event_id`` defaults to a new UUIDv7, ``timestamp`` to
    now in UTC. On the wire: one JSON object with these snake_case keys, unset optional
    keys omitted, ``timestamp`` in RFC 3339 (nanosecond fractions and any offset accepted).
    """

    event_id: str = msgspec.field(default_factory=_new_event_id)
    aggregate_id: str
    event_type: str
    event_version: int
    timestamp: Annotated[datetime, msgspec.Meta(tz=True)] = msgspec.field(default_factory=_utc_now)
    payload: Any
    trace_id: str | None = None
    correlation_id: str | None = None
    tenant_id: int | None = None

    def __post_init__(self) -> None:
        # Runs after __init__ and after decoding; msgspec has already checked JSON types
        # when decoding, but __init__ checks nothing, so types are checked here too.
        event_id = self.event_id
        if type(event_id) is not str or not event_id.strip():
            raise EnvelopeError("event_id", "must be a non-blank string")
        event_type = self.event_type
        if type(event_type) is not str or not event_type.strip():
            raise EnvelopeError("event_type", "must be a non-blank string")
        aggregate_id = self.aggregate_id
        # The regex is most of this method's cost: ids that passed it once are remembered.
        if type(aggregate_id) is not str or aggregate_id not in _VALID_AGGREGATES:
            _check_aggregate_id(aggregate_id)
        version = self.event_version
        if type(version) is not int or not 0 < version <= _INT64_MAX:
            raise EnvelopeError("event_version", f"must be an integer > 0, got {version!r}")
        timestamp = self.timestamp
        if (type(timestamp) is not datetime or timestamp.tzinfo is None) and (
            not isinstance(timestamp, datetime) or timestamp.utcoffset() is None
        ):
            raise EnvelopeError("timestamp", "must be a timezone-aware datetime")
        payload = self.payload
        if type(payload) is dict:
            pass  # the common case, decoded or built: nothing to check
        elif payload is None:
            raise EnvelopeError("payload", "is required")
        elif isinstance(payload, _BYTES):
            raw = bytes(payload)
            if not raw.strip():
                raise EnvelopeError("payload", "must not be empty")
            try:
                msgspec.json.decode(raw)
            except (msgspec.MsgspecError, ValueError) as exc:
                raise EnvelopeError("payload", f"raw bytes are not valid JSON: {exc}") from None
            _force_setattr(self, "payload", msgspec.Raw(raw))
        if self.trace_id is not None:
            _optional_text(self, "trace_id", self.trace_id)
        if self.correlation_id is not None:
            _optional_text(self, "correlation_id", self.correlation_id)
        tenant = self.tenant_id
        if tenant is not None and (type(tenant) is not int or abs(tenant) > _INT64_MAX):
            raise EnvelopeError("tenant_id", "must be a 64-bit integer or None")

    # -- wire format -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Encode as one JSON object with snake_case keys; unset optional keys are omitted."""
        try:
            return _encode(self)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EnvelopeError("payload", f"not JSON-serialisable: {exc}") from None

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | str) -> Envelope:
        """Decode an envelope; any malformed input raises :class:`EnvelopeError`."""
        try:
            return _decode(data)
        except msgspec.ValidationError as exc:
            if isinstance(exc.__cause__, EnvelopeError):
                raise exc.__cause__ from None
            text = str(exc)
            match = _FIELD_IN_ERROR.search(text)
            field = match.group(1) if match else "envelope"
            if text.startswith("Object missing required field"):
                field = text.split("`")[1]
                raise EnvelopeError(field, "is required") from None
            raise EnvelopeError(field, text) from None
        except (msgspec.MsgspecError, ValueError, TypeError) as exc:
            raise EnvelopeError("envelope", f"not valid JSON: {exc}") from None
        except RecursionError:  # e.g. thousands of nested arrays in the payload
            raise EnvelopeError("envelope", "JSON nested too deeply") from None

    def payload_json(self) -> bytes:
        """The payload as JSON text."""
        payload = self.payload
        if type(payload) is msgspec.Raw:
            return bytes(payload)
        return _encode(payload)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Envelope).decode


def _check_aggregate_id(aggregate_id: object) -> None:
    if type(aggregate_id) is not str or not _AGGREGATE_ID.fullmatch(aggregate_id):
        if type(aggregate_id) is str and not aggregate_id.strip():
            raise EnvelopeError("aggregate_id", "must not be blank")
        raise EnvelopeError("aggregate_id", "must be 1 to 256 characters of A-Z a-z 0-9 : _ - . /")
    if len(_VALID_AGGREGATES) >= _VALID_AGGREGATES_MAX:
        _VALID_AGGREGATES.clear()  # bounded; a service's hot aggregates come back at once
    _VALID_AGGREGATES.add(aggregate_id)


def _optional_text(envelope: Envelope, name: str, value: object) -> None:
    if type(value) is not str:
        raise EnvelopeError(name, "must be a string or None")
    if not value:
        # Go's encoding/json writes "" for an unset string without omitempty: unset it.
        _force_setattr(envelope, name, None)


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
