"""A dead letter refused for good is written once in its reduced form; if even that is
refused for good, it is retried with backoff (the key waits, nothing is dropped) — never
reduced again in a loop. An empty value is the ``b""`` singleton, so "is the value still
the original?" cannot tell a reduced dead letter from the original of an empty record:
the core looped without backoff, and on memory (whose refusal raises before any await)
blocked the event loop for good."""

from __future__ import annotations

import logging

import keybus
from keybus.testing import LeakChecker
from tests.conftest import unique
from tests.helpers import Collected, eventually


class _Once(logging.Handler):
    """Counts the core's "writing it reduced" warnings; a second one for the same record
    raises out of the core's log call (a Handler's emit is not guarded), turning the
    loop that never yields into a failure instead of a hang."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reduced = 0
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "writing it reduced" in text:
            self.reduced += 1
            if self.reduced > 1:
                raise RuntimeError("the dead letter was reduced again: a loop without backoff")
        elif "dead-lettering to" in text:
            self.retries += 1


async def test_an_empty_record_whose_reduced_dead_letter_is_refused_waits_with_backoff(
    no_leaks: LeakChecker,
) -> None:
    watcher = _Once()
    core_log = logging.getLogger("keybus")
    core_log.addHandler(watcher)
    # Small enough that even the reduced form (500 characters of error) is refused.
    url = f"memory://{unique('reduced')}"
    bus = await keybus.connect(url, max_message_bytes=400)
    try:
        topic = unique("t")
        handled = Collected()

        async def handler(message: keybus.Message) -> None:
            if message.value == b"":
                raise RuntimeError("e" * 3000)
            await handled(message)

        await bus.subscribe(topic, handler, max_attempts=1, retry_backoff=0.01)
        await bus.publish(topic, b"", key="poison")
        await eventually(lambda: watcher.retries >= 3, what="retries of the reduced form")
        # The loop is alive: another key is handled meanwhile.
        await bus.publish(topic, b"fine", key="other")
        await eventually(lambda: handled.values() == [b"fine"], what="another key")
        assert watcher.reduced == 1
    finally:
        # The poison's dead letter is still being retried: the close cancels it (left
        # uncommitted, redelivered to the next member).
        await bus.close(timeout=0.2)
        core_log.removeHandler(watcher)
