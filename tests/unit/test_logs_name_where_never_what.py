"""keybus's log records say where a message is (topic, partition, offset, group, key,
attempt: structured fields on the record) and never what it holds: neither its payload
nor an exception's text (which may quote the payload) reach a log line, even at DEBUG."""

from __future__ import annotations

import logging

import pytest

import keybus
from keybus.partitioning import key_partition
from keybus.testing import LeakChecker
from tests.helpers import eventually

CANARY = "payload-canary-7f3a"


async def test_a_dead_letter_is_logged_with_where_it_was_and_without_its_payload(
    no_leaks: LeakChecker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="keybus")

    async def failing(env: keybus.Envelope) -> None:
        raise ValueError(f"cannot apply {env.payload}")

    async with keybus.connect("memory://logs", group="billing") as bus:
        sub = await bus.subscribe_envelope("orders", failing, max_attempts=2, retry_backoff=0.001)
        sent = keybus.Envelope(
            aggregate_id="order-42", event_type="E", event_version=1, payload={"s": CANARY}
        )
        await bus.publish_envelope("orders", sent)
        await eventually(lambda: sub.stats().dead_lettered == 1, what="the dead letter")
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    dead = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(retried) == 1
    assert retried[0].levelno == logging.DEBUG
    (record,) = dead
    assert record.levelno == logging.WARNING
    fields = {f: getattr(record, f) for f in ("topic", "partition", "offset", "group", "key")}
    assert fields == {
        "topic": "orders",
        "partition": key_partition("order-42", 3),  # memory's default: 3 partitions
        "offset": 0,
        "group": "billing",
        "key": "order-42",
    }
    assert record.attempt == 2  # type: ignore[attr-defined]
    assert "ValueError" in record.getMessage()
    for r in caplog.records:
        assert CANARY not in r.getMessage()
        assert CANARY not in str(r.args)
