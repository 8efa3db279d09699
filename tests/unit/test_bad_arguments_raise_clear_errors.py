"""Programming errors — a bad argument, an unknown option, a URL no backend serves —
raise at once, typed and naming what is wrong, and leave nothing open."""

from __future__ import annotations

import pytest

import keybus
from keybus.subscription import SubscribeOptions
from keybus.testing import LeakChecker


async def test_unknown_scheme_is_a_connect_error_naming_the_url() -> None:
    with pytest.raises(keybus.ConnectError, match="redis://x"):
        await keybus.connect("redis://x")
    with pytest.raises(keybus.ConnectError):
        await keybus.connect("no-scheme-at-all")


def test_subscribe_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        SubscribeOptions(max_concurrency=0)
    with pytest.raises(ValueError, match="max_attempts"):
        SubscribeOptions(max_attempts=0)
    assert SubscribeOptions(retry_backoff=0.1).backoff(3) == pytest.approx(0.4)
    assert SubscribeOptions(retry_backoff=10, max_retry_backoff=15).backoff(5) == 15


async def test_bad_arguments_get_clear_type_errors(no_leaks: LeakChecker) -> None:
    async with keybus.connect("memory://unit-args") as bus:
        with pytest.raises(TypeError, match="value must be bytes"):
            await bus.publish("t", "text")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="invalid topic"):
            await bus.publish("bad topic!", b"x")
        with pytest.raises(TypeError, match="unknown subscribe option"):
            await bus.subscribe("t", lambda m: None, max_concurency=3)
        with pytest.raises(TypeError, match="header"):
            await bus.publish("t", b"x", headers={"h": 5})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="unknown options"):
        await keybus.connect("memory://unit-args", bogus=1)


async def test_argument_errors_are_clear_and_typed(no_leaks: LeakChecker) -> None:
    async with keybus.connect("memory://review-args") as bus:
        with pytest.raises(TypeError, match="headers must be a mapping"):
            await bus.publish("t", b"x", headers=[("h", "v")])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="topic must be a str"):
            await bus.subscribe(123, lambda m: None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="invalid subscribe option"):
            await bus.subscribe("t", lambda m: None, max_attempts="3")
        with pytest.raises(ValueError, match="dead_letter_topic must differ"):
            await bus.subscribe("t", lambda m: None, dead_letter_topic="t")
        assert not bus.subscriptions


def test_topic_config_compacted_is_a_bool() -> None:
    with pytest.raises(ValueError, match="compacted must be a bool"):
        keybus.TopicConfig(compacted="yes")  # type: ignore[arg-type]
    assert keybus.TopicConfig(compacted=True).compacted
