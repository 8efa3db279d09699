"""A consumed Kafka record's headers, read lazily."""

from __future__ import annotations

import logging

from keybus.message import LazyHeaders

__all__ = ["RecordHeaders"]

log = logging.getLogger("keybus.kafka")


class RecordHeaders(LazyHeaders):
    """A consumed Kafka record's headers, converted on first use (on the loop, not the
    consumer thread, where it cost ~1.5 µs a record with the GIL held). A header without
    a value reads as ``b""``; a repeated name keeps the last value."""

    __slots__ = ()

    def _load(self) -> dict[str, bytes]:
        try:
            raw = self._source.headers()
            return {k: (v if v is not None else b"") for k, v in raw} if raw else {}
        except Exception as exc:
            # A foreign producer's header confluent-kafka cannot convert (a name that is
            # not UTF-8). Raising here would fail whoever reads the headers — the core's
            # dead-lettering too, which would stall the partition's commits.
            log.warning("keybus: unreadable headers on a Kafka record: %r", exc)
            return {"X-Keybus-Header-Error": f"{type(exc).__name__}: {exc}".encode()}
