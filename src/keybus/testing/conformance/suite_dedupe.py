"""Conformance: one duplicate rule on every backend — nothing acknowledged is dropped.
By default every record is stored and delivered, however many share an event id. With
``dedupe_window`` (where the backend declares ``dedupe``) a duplicate publish is reported
to its caller as a permanent ``PublishError``, never swallowed; a backend that cannot
de-duplicate refuses the window at connect. A dead letter re-published to its topic is
never taken for a duplicate."""

from __future__ import annotations

import pytest

import keybus
from keybus.testing.conformance.backend import Backend
from keybus.testing.conformance.fixtures import BackendFixtures, BusFactory
from keybus.testing.conformance.helpers import Collected, eventually, watch_dead_letters

__all__ = ["DedupeSuite"]

_KEY = "agg"
_EVENT_ID = "0190a6f1-8f2c-7cc0-9a43-5d1c2f6b7e01"
_RAW_ID = {"X-Event-ID": "raw-event-1"}  # a raw record naming its event, as a Go service may
_WINDOW = 60.0


def _twin(version: int) -> keybus.Envelope:
    """One of two envelopes with one event id and different content."""
    return keybus.Envelope(
        event_id=_EVENT_ID,
        aggregate_id=_KEY,
        event_type="T",
        event_version=version,
        payload={"n": version},
    )


def _versions(messages: Collected) -> list[int | bytes]:
    """Each delivery as its envelope's version, or its value when it is no envelope."""
    out: list[int | bytes] = []
    for message in messages:
        try:
            out.append(keybus.Envelope.from_bytes(message.value).event_version)
        except keybus.EnvelopeError:
            out.append(message.value)
    return out


class DedupeSuite(BackendFixtures):
    async def test_by_default_records_sharing_an_event_id_are_all_stored_and_delivered(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus(dedupe_window=None)  # off, spelled out: every backend takes it
        topic = backend.topic("dupoff")
        got = Collected()
        await bus.subscribe(topic, got)
        for version in (1, 2):
            await bus.publish_envelope(topic, _twin(version))
        for _ in range(2):
            await bus.publish(topic, b"raw", key=_KEY, headers=_RAW_ID)
        await eventually(lambda: len(got) == 4, what="all four records")
        assert _versions(got) == [1, 2, b"raw", b"raw"]
        assert [m.headers["X-Event-ID"] for m in got] == [_EVENT_ID.encode()] * 2 + [
            b"raw-event-1"
        ] * 2

    async def test_with_a_dedupe_window_a_duplicate_publish_raises_and_is_not_delivered(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        backend.require("dedupe")
        bus = await open_bus(dedupe_window=_WINDOW)
        topic = backend.topic("dupon")
        got = Collected()
        await bus.subscribe(topic, got)  # creates the topic: with this bus's window
        await bus.publish_envelope(topic, _twin(1))
        with pytest.raises(keybus.PublishError) as raised:
            await bus.publish_envelope(topic, _twin(2))
        error = raised.value
        assert (error.topic, error.permanent) == (topic, True)
        assert "duplicate" in error.reason
        await bus.publish(topic, b"raw", key=_KEY, headers=_RAW_ID)
        with pytest.raises(keybus.PublishError, match="duplicate") as raw:
            await bus.publish(topic, b"raw again", key=_KEY, headers=_RAW_ID)
        assert raw.value.permanent
        for _ in range(2):  # no event id: nothing to de-duplicate by
            await bus.publish(topic, b"plain", key=_KEY)
        marker = keybus.Envelope(aggregate_id=_KEY, event_type="T", event_version=3, payload={})
        await bus.publish_envelope(topic, marker)  # the key's last record: after the rest
        await eventually(lambda: len(got) == 5, what="five records")
        assert _versions(got) == [1, b"raw", b"plain", b"plain", 3], "no duplicate delivered"

    async def test_a_backend_that_cannot_dedupe_refuses_a_window_at_connect(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        """Never a window taken and silently not applied. And on every backend a window
        that is not a positive number of seconds is a ``ValueError``."""
        for bad in (0, -1.0, "60"):
            with pytest.raises(ValueError, match="dedupe_window"):
                await open_bus(dedupe_window=bad)
        if backend.features.dedupe:
            pytest.skip(f"{backend.name} declares the feature 'dedupe'")
        with pytest.raises(ValueError, match="dedupe_window") as raised:
            await open_bus(dedupe_window=_WINDOW)
        assert not isinstance(raised.value, keybus.KeybusError), "a bad argument, not an event"

    @pytest.mark.parametrize("window", [None, _WINDOW], ids=["dedupe-off", "dedupe-on"])
    async def test_a_dead_letter_republished_to_its_topic_is_delivered(
        self, open_bus: BusFactory, backend: Backend, window: float | None
    ) -> None:
        """A dead letter carries its event's ``X-Event-ID``; re-published as it is to the
        topic (to be handled again once the bug is fixed) within the window, it must not
        be taken for a duplicate of the event it came from."""
        if window is not None:
            backend.require("dedupe")
        bus = await open_bus(dedupe_window=window)
        topic = backend.topic("dupdlq")
        letters = await watch_dead_letters(open_bus, topic)
        seen: list[int] = []
        fixed = False

        async def handler(event: keybus.Envelope) -> None:
            if not fixed:
                raise RuntimeError("a bug")
            seen.append(event.event_version)

        await bus.subscribe_envelope(topic, handler, max_attempts=1)
        await bus.publish_envelope(topic, _twin(1))
        await eventually(lambda: len(letters) == 1, what="the dead letter")
        fixed = True
        letter = letters[0]
        assert letter.headers["X-Event-ID"] == _EVENT_ID.encode()
        await bus.publish(topic, letter.value, key=letter.key, headers=dict(letter.headers))
        await eventually(lambda: seen == [1], what="the re-published dead letter handled")
