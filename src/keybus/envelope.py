"""The domain-event envelope: fields, validation and the Go-compatible JSON wire format.

The codec sits on the hot path (every publish encodes, every envelope delivery decodes),
so the envelope is a msgspec Struct: encoding and typed decoding run in C, and the only
Python on the way is ``__post_init__`` with the rules msgspec cannot express.

Where the Go SDK's services are the contract on the wire, their rules are ours
(``shared/interop`` holds what they emit and accept; ``docs/interop.md`` lists the few
differences and why):

* decoding requires ``event_id`` (an id invented on decode would change on every
  redelivery and break de-duplication); construction still generates a UUIDv7;
* an ``aggregate_id`` is validated trimmed and kept as it is (Go accepts `` order-1 ``);
* timestamps keep the nanoseconds and the zone offset they were written with: Go writes
  RFC 3339 with nine fraction digits, which a ``datetime`` cannot hold, so such a value
  is a :class:`Timestamp` (a ``datetime`` that also keeps its exact text) and re-encodes
  to the same text; a missing or ``null`` timestamp decodes as Go's zero time;
* numbers that JSON cannot carry (NaN, infinities) are refused at construction.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta
from math import isfinite
from typing import Annotated, Any

import msgspec
import uuid_utils

from keybus.errors import EnvelopeError

__all__ = ["GO_ZERO_TIME", "Envelope", "Timestamp", "envelope_headers"]

# The Go SDK's rule for aggregate ids: 1..256 characters of A-Za-z0-9:_-./ (trimmed)
_AGGREGATE_ID = re.compile(r"[A-Za-z0-9:_\-./]{1,256}")
_INT64_MAX = 2**63 - 1  # the Go services decode these fields as int64
_FIELD_IN_ERROR = re.compile(r"at `\$\.([a-z_]+)")
_force_setattr = msgspec.structs.force_setattr
# Aggregate ids that passed the rule (exact str only): a service sees the same aggregates
# over and over.
_VALID_AGGREGATES: set[str] = set()
_VALID_AGGREGATES_MAX = 65_536
_BYTES = (bytes, bytearray, memoryview)  # a tuple: `bytes | ...` would build a union per call
# RFC 3339 as Go's time.RFC3339Nano parses it: upper-case T and Z, an offset of hours and
# minutes, any number of fraction digits.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})"
)
_FRACTION = re.compile(r"\.(\d+)")

GO_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)
"""Go's zero ``time.Time``: what a missing or ``null`` timestamp decodes as (as in Go)."""


class _Decoding(threading.local):
    """Set while from_bytes decodes: the defaults then mean "missing on the wire", not
    "omitted by the caller". Decoding is synchronous (no await inside), so per thread is
    exact."""

    active = False


_decoding = _Decoding()


def _new_event_id() -> str:
    if _decoding.active:
        raise EnvelopeError("event_id", "is required")
    return str(uuid_utils.uuid7())


def _utc_now() -> datetime:
    if _decoding.active:
        return GO_ZERO_TIME
    return datetime.now(UTC)


class Timestamp(datetime):
    """A ``datetime`` that keeps the exact RFC 3339 text it came from: nanoseconds (a
    ``datetime`` stops at microseconds, and rounding would even roll
    ``…59.999999999`` into the next second) and the zone offset as written. It encodes
    back to that text; ``nanosecond`` is the digits beyond ``microsecond`` (0-999) and
    :attr:`Envelope.timestamp_ns` the exact instant."""

    __slots__ = ("nanosecond", "text")

    nanosecond: int
    text: str

    @classmethod
    def parse(cls, text: str) -> Timestamp:
        """Parse RFC 3339 as Go does; ``ValueError`` otherwise."""
        if _RFC3339.fullmatch(text) is None:
            raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
        return cls._exact(text)

    @classmethod
    def _exact(cls, text: str) -> Timestamp:
        """``text`` known to be valid RFC 3339 (checked by the caller)."""
        stamp = cls.fromisoformat(text)  # C; keeps microseconds, drops the rest (3.11+)
        fraction = _FRACTION.match(text, 19)
        stamp.nanosecond = int(fraction.group(1)[6:9].ljust(3, "0")) if fraction else 0
        stamp.text = text
        return stamp


def _encode_hook(value: Any) -> Any:
    if type(value) is Timestamp:
        return value.text
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One domain event. Immutable and valid by construction: invalid fields raise
    :class:`EnvelopeError` naming the field, so a constructed envelope can always be sent.

    ``payload`` is any JSON value; ``bytes`` are taken as raw JSON text and embedded as is
    (kept as :class:`msgspec.Raw`); NaN and infinities are refused. ``event_id`` defaults
    to a new UUIDv7, ``timestamp`` to now in UTC (a zone offset with seconds, which RFC
    3339 cannot write, is converted to UTC: same instant). On the wire: one JSON object
    with these snake_case keys, unset optional keys omitted, ``timestamp`` in RFC 3339;
    a decoded timestamp keeps its nanoseconds and offset (:class:`Timestamp`).
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
        # The rule is most of this method's cost: ids that passed it once are remembered.
        if type(aggregate_id) is not str or aggregate_id not in _VALID_AGGREGATES:
            _check_aggregate_id(aggregate_id)
        version = self.event_version
        if type(version) is not int or not 0 < version <= _INT64_MAX:
            raise EnvelopeError("event_version", f"must be an integer > 0, got {version!r}")
        timestamp = self.timestamp
        if type(timestamp) is not datetime or timestamp.tzinfo is not UTC:
            _check_timestamp(self, timestamp)
        payload = self.payload
        if type(payload) is dict:
            # The common case. Decoded JSON holds no NaN; what a caller built may.
            if not _decoding.active:
                for item in payload.values():
                    kind = type(item)
                    if kind is float:
                        if not isfinite(item):
                            _not_finite(item)
                    elif kind not in _SAFE:
                        _check_finite(item)
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
        elif not _decoding.active:
            _check_finite(payload)
        if self.trace_id is not None:
            _optional_text(self, "trace_id", self.trace_id)
        if self.correlation_id is not None:
            _optional_text(self, "correlation_id", self.correlation_id)
        tenant = self.tenant_id
        if tenant is not None and (type(tenant) is not int or abs(tenant) > _INT64_MAX):
            raise EnvelopeError("tenant_id", "must be a 64-bit integer or None")

    @property
    def timestamp_ns(self) -> int:
        """The exact instant: nanoseconds since the Unix epoch (nanoseconds included when
        the wire carried them)."""
        stamp = self.timestamp
        micros = (stamp - _EPOCH) // _MICROSECOND
        return micros * 1000 + (stamp.nanosecond if type(stamp) is Timestamp else 0)

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
        _decoding.active = True
        try:
            try:
                envelope = _decode(data)
            except msgspec.ValidationError as exc:
                if "at `$.timestamp`" in str(exc):
                    # null, or a value msgspec cannot hold (…59.999999999 in year 9999).
                    return _decode_exotic_timestamp(data)
                raise
            # A datetime holds microseconds: a finer fraction is kept as a Timestamp, and
            # Go's stricter spelling is enforced (msgspec also takes "t", "z", " ").
            text = _stamp_decode(data).timestamp
            if text is not None:
                if text[10:11] != "T" or text[-1:] == "z":
                    raise EnvelopeError("timestamp", f"must be RFC 3339 as Go writes it: {text!r}")
                if text[19:20] == "." and text[20:27].isdigit():  # finer than microseconds
                    _force_setattr(envelope, "timestamp", Timestamp._exact(text))
            return envelope
        except EnvelopeError:
            raise
        except msgspec.ValidationError as exc:
            raise _validation_error(exc) from None
        except (msgspec.MsgspecError, ValueError, TypeError) as exc:
            raise EnvelopeError("envelope", f"not valid JSON: {exc}") from None
        except RecursionError:  # e.g. thousands of nested arrays in the payload
            raise EnvelopeError("envelope", "JSON nested too deeply") from None
        finally:
            _decoding.active = False

    def payload_json(self) -> bytes:
        """The payload as JSON text."""
        payload = self.payload
        if type(payload) is msgspec.Raw:
            return bytes(payload)
        return _encode(payload)


class _StampText(msgspec.Struct, gc=False):
    """Just the timestamp's text, read next to the typed decode (C, ~0.3 µs)."""

    timestamp: str | None = None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_stamp_decode = msgspec.json.Decoder(_StampText).decode


def _parse_timestamp(text: str) -> Timestamp:
    try:
        return Timestamp.parse(text)
    except ValueError as exc:
        raise EnvelopeError("timestamp", f"must be RFC 3339: {exc}") from None


def _decode_exotic_timestamp(data: bytes | bytearray | memoryview | str) -> Envelope:
    """The slow path for a timestamp msgspec refuses: ``null`` (Go's zero time, as Go
    reads it) or a Go value a ``datetime`` cannot round to."""
    doc = msgspec.json.decode(data)
    if not isinstance(doc, dict):
        raise EnvelopeError("envelope", "not a JSON object")
    text = doc.get("timestamp")
    stamp: datetime | None = None
    if text is None:
        doc["timestamp"] = GO_ZERO_TIME
    elif type(text) is str:
        stamp = _parse_timestamp(text)
        doc["timestamp"] = datetime.fromisoformat(stamp.isoformat())  # plain, for convert
    else:
        raise EnvelopeError("timestamp", "must be an RFC 3339 string")
    envelope = msgspec.convert(doc, Envelope)
    if stamp is not None:
        _force_setattr(envelope, "timestamp", stamp)
    return envelope


def _validation_error(exc: msgspec.ValidationError) -> EnvelopeError:
    if isinstance(exc.__cause__, EnvelopeError):
        return exc.__cause__
    text = str(exc)
    if text.startswith("Object missing required field"):
        return EnvelopeError(text.split("`")[1], "is required")
    match = _FIELD_IN_ERROR.search(text)
    return EnvelopeError(match.group(1) if match else "envelope", text)


_encode = msgspec.json.Encoder(enc_hook=_encode_hook).encode
_decode = msgspec.json.Decoder(Envelope).decode


def _check_aggregate_id(aggregate_id: object) -> None:
    # Go's rule, on the trimmed value; the id itself is kept as it is (spaces included).
    if type(aggregate_id) is not str or not _AGGREGATE_ID.fullmatch(aggregate_id.strip()):
        if type(aggregate_id) is str and not aggregate_id.strip():
            raise EnvelopeError("aggregate_id", "must not be blank")
        raise EnvelopeError("aggregate_id", "must be 1 to 256 characters of A-Z a-z 0-9 : _ - . /")
    if len(_VALID_AGGREGATES) >= _VALID_AGGREGATES_MAX:
        _VALID_AGGREGATES.clear()  # bounded; a service's hot aggregates come back at once
    _VALID_AGGREGATES.add(aggregate_id)


def _check_timestamp(envelope: Envelope, timestamp: object) -> None:
    if not isinstance(timestamp, datetime) or timestamp.utcoffset() is None:
        raise EnvelopeError("timestamp", "must be a timezone-aware datetime")
    if type(timestamp) is Timestamp:
        return
    offset = timestamp.utcoffset()
    if offset is not None and (offset.seconds % 60 or offset.microseconds):
        # RFC 3339 writes offsets in minutes; msgspec would drop the seconds and shift
        # the instant. The same instant in UTC is what can be written exactly.
        _force_setattr(envelope, "timestamp", timestamp.astimezone(UTC))


def _check_finite(value: object) -> None:
    """Refuse NaN and infinities anywhere in a payload: JSON has no spelling for them
    (msgspec would write ``null``, which no reader decodes back)."""
    kind = type(value)
    if kind is float:
        if not isfinite(value):  # type: ignore[arg-type]
            _not_finite(value)
    elif kind is dict:
        for item in value.values():  # type: ignore[attr-defined]
            if type(item) not in _SAFE:
                _check_finite(item)
    elif kind is list or kind is tuple:
        for item in value:  # type: ignore[attr-defined]
            if type(item) not in _SAFE:
                _check_finite(item)


def _not_finite(value: object) -> None:
    raise EnvelopeError("payload", f"JSON cannot carry {value!r}")


_SAFE = frozenset({str, int, bool, type(None)})  # what needs no look inside


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
    if envelope.tenant_id is not None:
        headers["X-Tenant-ID"] = str(envelope.tenant_id).encode()
    return headers
