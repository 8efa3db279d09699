"""The envelope on the wire, against what the Go SDK's services themselves emit and
accept (golden data recorded from the Go SDK: tests/golden/go_sdk/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from keybus import Envelope, EnvelopeError
from keybus.envelope import envelope_headers
from keybus.partitioning import partition_for

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "go_sdk"

# Cases keybus decides as Go does but reads differently, each with the reason (also in
# docs/interop.md). Nothing else may differ.
VALUE_DIFFERENCES = {
    # Go's encoding/json matches keys case-insensitively, so a later "Event_ID" overrides
    # "event_id". keybus's wire keys are exact: the extra key is ignored like any unknown.
    "uppercase-keys": {"event_id"},
}


def _cases(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (GOLDEN / name).read_text().splitlines() if line]


def _check_as_go_reads_it(envelope: Envelope, expected: dict[str, Any], skip: set[str]) -> None:
    got = {
        "event_id": envelope.event_id,
        "aggregate_id": envelope.aggregate_id,
        "event_type": envelope.event_type,
        "event_version": envelope.event_version,
        # Go has no "unset": its zero values are keybus's None.
        "trace_id": envelope.trace_id or "",
        "correlation_id": envelope.correlation_id or "",
        "tenant_id": envelope.tenant_id or 0,
        "unix_nano": envelope.timestamp_ns,
        "offset_seconds": envelope.timestamp.utcoffset().total_seconds(),  # type: ignore[union-attr]
    }
    for field, value in got.items():
        if field in skip or field not in expected:
            continue
        if field == "unix_nano" and envelope.timestamp.year == 1:
            continue  # Go's UnixNano of its zero time overflows int64: no value to compare
        assert value == expected[field], (field, value, expected[field])
    assert json.loads(envelope.payload_json()) == json.loads(expected["payload"])


@pytest.mark.parametrize("case", _cases("go-encoded.jsonl"), ids=lambda c: c["name"])
def test_every_go_encoded_envelope_decodes_to_what_go_reads(case: dict[str, Any]) -> None:
    if not case["go_accepts"]:
        with pytest.raises(EnvelopeError):
            Envelope.from_bytes(case["wire"])
        return
    envelope = Envelope.from_bytes(case["wire"].encode())
    _check_as_go_reads_it(envelope, case["go_decoded"], set())


@pytest.mark.parametrize(
    "case", [c for c in _cases("go-encoded.jsonl") if c["go_accepts"]], ids=lambda c: c["name"]
)
def test_re_encoding_a_go_envelope_keeps_its_instant_and_zone(case: dict[str, Any]) -> None:
    envelope = Envelope.from_bytes(case["wire"].encode())
    wire = envelope.to_bytes()
    again = Envelope.from_bytes(wire)
    assert again.timestamp_ns == envelope.timestamp_ns
    assert again.timestamp.utcoffset() == envelope.timestamp.utcoffset()
    # The timestamp text itself goes back out as Go wrote it.
    stamp = msgspec.json.decode(wire)["timestamp"]
    assert stamp == case["go_decoded"]["timestamp"]
    _check_as_go_reads_it(again, case["go_decoded"], set())


@pytest.mark.parametrize("case", _cases("go-decode-verdicts.jsonl"), ids=lambda c: c["name"])
def test_every_hand_made_wire_is_decided_as_go_decides_it(case: dict[str, Any]) -> None:
    if not case["go_accepts"]:
        with pytest.raises(EnvelopeError):
            Envelope.from_bytes(case["wire"].encode())
        return
    envelope = Envelope.from_bytes(case["wire"].encode())
    _check_as_go_reads_it(envelope, case["go_decoded"], VALUE_DIFFERENCES.get(case["name"], set()))


def test_decoding_never_invents_an_event_id_but_construction_does() -> None:
    wire = b'{"aggregate_id":"a","event_type":"T","event_version":1,"payload":{}}'
    with pytest.raises(EnvelopeError) as raised:
        Envelope.from_bytes(wire)
    assert raised.value.field == "event_id"
    assert Envelope(aggregate_id="a", event_type="T", event_version=1, payload={}).event_id


def test_an_offset_with_seconds_is_written_as_the_same_instant() -> None:
    from datetime import datetime, timedelta, timezone

    zone = timezone(timedelta(hours=5, seconds=30))
    when = datetime(2025, 10, 14, 16, 15, 46, 123456, tzinfo=zone)
    envelope = Envelope(
        aggregate_id="a", event_type="T", event_version=1, payload={}, timestamp=when
    )
    again = Envelope.from_bytes(envelope.to_bytes())
    assert again.timestamp == when  # aware datetimes compare by instant
    assert again.timestamp_ns == envelope.timestamp_ns


@pytest.mark.parametrize(
    "payload",
    [float("nan"), float("inf"), {"a": float("-inf")}, [1, [2, {"b": float("nan")}]]],
    ids=["nan", "inf", "nested-dict", "nested-list"],
)
def test_non_finite_numbers_are_refused_at_construction(payload: Any) -> None:
    with pytest.raises(EnvelopeError) as raised:
        Envelope(aggregate_id="a", event_type="T", event_version=1, payload=payload)
    assert raised.value.field == "payload"


def test_headers_carry_the_tenant_as_go_does() -> None:
    envelope = Envelope(aggregate_id="a", event_type="T", event_version=1, payload={}, tenant_id=42)
    assert envelope_headers(envelope)["X-Tenant-ID"] == b"42"
    plain = Envelope(aggregate_id="a", event_type="T", event_version=1, payload={})
    assert "X-Tenant-ID" not in envelope_headers(plain)


def _sarama_placements() -> list[tuple[str, int, int]]:
    rows = (GOLDEN / "sarama-partitions.tsv").read_text().splitlines()[1:]
    return [(key, int(n), int(p)) for key, n, p in (row.split("\t") for row in rows)]


def test_every_key_lands_on_the_partition_sarama_picks() -> None:
    """The Go services' producer (sarama's FNV-1a hash partitioner) and keybus put an
    aggregate on the same partition, so the two can publish one aggregate in order."""
    placements = _sarama_placements()
    assert len(placements) > 1000
    wrong = [(k, n, p) for k, n, p in placements if partition_for(k, n, iter(())) != p]
    assert not wrong, wrong[:10]
