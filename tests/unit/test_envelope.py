"""Envelope: validation rules, the Go-compatible wire format, and junk input."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keybus import Envelope, EnvelopeError

AGGREGATE_CHARS = "ABCXYZabcxyz0189:_-./"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

envelopes = st.builds(
    Envelope,
    aggregate_id=st.text(AGGREGATE_CHARS, min_size=1, max_size=256),
    event_type=st.text(min_size=1, max_size=30).filter(str.strip),
    event_version=st.integers(min_value=1, max_value=2**63 - 1),
    payload=json_values.filter(lambda v: v is not None),
    event_id=st.uuids().map(str),
    timestamp=st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
    ),
    trace_id=st.none() | st.text(min_size=1, max_size=20),
    correlation_id=st.none() | st.text(min_size=1, max_size=20),
    tenant_id=st.none() | st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1),
)


@given(envelopes)
def test_any_valid_envelope_round_trips(envelope: Envelope) -> None:
    assert Envelope.from_bytes(envelope.to_bytes()) == envelope


@given(st.binary(max_size=300) | st.text(max_size=300))
def test_junk_bytes_raise_envelope_error_only(data: bytes | str) -> None:
    with contextlib.suppress(EnvelopeError):
        Envelope.from_bytes(data)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "event_id",
                "aggregate_id",
                "event_type",
                "event_version",
                "timestamp",
                "payload",
                "trace_id",
                "correlation_id",
                "tenant_id",
                "extra",
            ]
        ),
        json_values,
        max_size=10,
    )
)
def test_json_objects_with_wrong_fields_raise_envelope_error_only(doc: dict[str, Any]) -> None:
    data = msgspec.json.encode(doc)
    try:
        envelope = Envelope.from_bytes(data)
    except EnvelopeError as exc:
        error: EnvelopeError | None = exc
    else:
        error = None
        assert envelope.event_version > 0
    assert error is None or error.field, "the error names the field (or 'envelope')"


def test_wire_format_is_one_flat_object_with_snake_case_keys_and_raw_payload() -> None:
    envelope = Envelope(
        aggregate_id="order-42",
        event_type="OrderCreated",
        event_version=3,
        payload={"amount": 12.5},
        event_id="0191e0e0-0000-7000-8000-000000000000",
        timestamp=datetime(2025, 10, 14, 2, 20, 30, 123456, tzinfo=UTC),
    )
    assert envelope.to_bytes() == (
        b'{"event_id":"0191e0e0-0000-7000-8000-000000000000","aggregate_id":"order-42",'
        b'"event_type":"OrderCreated","event_version":3,'
        b'"timestamp":"2025-10-14T02:20:30.123456Z","payload":{"amount":12.5}}'
    )


def test_decodes_what_the_go_services_emit() -> None:
    go = (
        b'{"event_id":"e-1","aggregate_id":"order-42","event_type":"OrderCreated",'
        b'"event_version":3,"timestamp":"2025-10-14T10:20:30.123456789+08:00",'
        b'"payload":{"amount":12.5},"trace_id":"t","correlation_id":"","tenant_id":9}'
    )
    envelope = Envelope.from_bytes(go)
    # The microseconds as a datetime holds them (truncated, never rounded: a rounded
    # .999999999 would roll into the next second), the nanoseconds kept beside them.
    assert envelope.timestamp == datetime(
        2025, 10, 14, 10, 20, 30, 123456, tzinfo=timezone(timedelta(hours=8))
    )
    assert envelope.timestamp_ns == 1760408430123456789
    assert b'"timestamp":"2025-10-14T10:20:30.123456789+08:00"' in envelope.to_bytes()
    assert envelope.payload == {"amount": 12.5}
    assert envelope.trace_id == "t"
    assert envelope.correlation_id is None  # Go's "" means unset
    assert envelope.tenant_id == 9


def test_defaults_are_a_uuid7_and_now_in_utc() -> None:
    before = datetime.now(UTC)
    envelope = Envelope(aggregate_id="a", event_type="T", event_version=1, payload=[])
    assert envelope.event_id[14] == "7", "UUID version 7"
    assert before <= envelope.timestamp <= datetime.now(UTC)
    assert envelope.timestamp.tzinfo is not None
    later = Envelope(aggregate_id="a", event_type="T", event_version=1, payload=[])
    assert later.event_id > envelope.event_id, "UUIDv7 ids sort by time"


def test_bytes_payload_is_embedded_as_raw_json() -> None:
    envelope = Envelope(aggregate_id="a", event_type="T", event_version=1, payload=b'{"x": [1]}')
    assert b'"payload":{"x": [1]}' in envelope.to_bytes()
    assert envelope.payload_json() == b'{"x": [1]}'
    assert Envelope.from_bytes(envelope.to_bytes()).payload == {"x": [1]}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"aggregate_id": ""}, "aggregate_id"),
        ({"aggregate_id": "   "}, "aggregate_id"),
        ({"aggregate_id": "has space"}, "aggregate_id"),
        ({"aggregate_id": "a" * 257}, "aggregate_id"),
        ({"aggregate_id": "ünïcode"}, "aggregate_id"),
        ({"event_type": " "}, "event_type"),
        ({"event_id": ""}, "event_id"),
        ({"event_version": 0}, "event_version"),
        ({"event_version": -1}, "event_version"),
        ({"event_version": True}, "event_version"),
        ({"event_version": "1"}, "event_version"),
        ({"payload": None}, "payload"),
        ({"payload": b""}, "payload"),
        ({"payload": b"{nope"}, "payload"),
        ({"timestamp": datetime(2025, 1, 1)}, "timestamp"),
        ({"trace_id": 5}, "trace_id"),
        ({"tenant_id": "7"}, "tenant_id"),
        ({"tenant_id": 2**64}, "tenant_id"),
    ],
)
def test_invalid_fields_raise_envelope_error_naming_the_field(
    fields: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {
        "aggregate_id": "order-1",
        "event_type": "T",
        "event_version": 1,
        "payload": {},
    }
    args.update(fields)
    with pytest.raises(EnvelopeError) as info:
        Envelope(**args)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_aggregate_id_of_256_allowed_characters_is_valid() -> None:
    aggregate = ("A-z0:_./" * 32)[:256]
    envelope = Envelope(aggregate_id=aggregate, event_type="T", event_version=1, payload=1)
    assert Envelope.from_bytes(envelope.to_bytes()).aggregate_id == aggregate


def test_envelopes_are_immutable() -> None:
    envelope = Envelope(aggregate_id="a", event_type="T", event_version=1, payload=1)
    with pytest.raises(AttributeError):
        envelope.event_version = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "timestamp",
    ["2025-10-14", "2025-10-14T10:20:30", "yesterday", "2025-13-14T10:20:30Z", 1700000000],
)
def test_bad_timestamps_on_the_wire_are_rejected(timestamp: object) -> None:
    doc = {
        "event_id": "e",
        "aggregate_id": "a",
        "event_type": "T",
        "event_version": 1,
        "timestamp": timestamp,
        "payload": {},
    }
    with pytest.raises(EnvelopeError) as info:
        Envelope.from_bytes(msgspec.json.encode(doc))
    assert info.value.field == "timestamp"
