"""One configuration from a file (TOML, YAML, JSON) or a mapping, overridden by KEYBUS_*
environment variables, builds exactly the options ``keybus.connect`` takes; a bad value
is a ConfigError naming the key, the value (masked for secrets) and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import keybus
from keybus.config import load_config
from keybus.testing import LeakChecker
from tests.helpers import eventually

TOML = """
url = "memory://configured"
group = "billing"
connect_timeout = 5

[topic_config]
partitions = 2

[subscribe]
max_attempts = 2
retry_backoff = 0.001

[tls]
ca_file = "/etc/ca.pem"

[sasl]
mechanism = "SCRAM-SHA-512"
username = "svc"
password = "s3cret-canary"

[options]
commit_interval = 0.25
"""


def test_a_toml_file_builds_the_connect_options(tmp_path: Path) -> None:
    path = tmp_path / "keybus.toml"
    path.write_text(TOML)
    config = load_config(path, environ={})
    options = config.connect_options()
    assert (config.url, config.group) == ("memory://configured", "billing")
    assert options["topic_config"] == keybus.TopicConfig(partitions=2)
    assert options["subscribe_defaults"] == {"max_attempts": 2, "retry_backoff": 0.001}
    assert options["tls"] == keybus.TLS(ca_file="/etc/ca.pem")
    sasl = options["sasl"]
    assert isinstance(sasl, keybus.SASL)
    assert sasl.password is not None
    assert sasl.password.reveal() == "s3cret-canary"
    assert "s3cret-canary" not in repr(config.connect_options())
    assert options["commit_interval"] == 0.25
    assert options["connect_timeout"] == 5


def test_the_same_in_yaml_and_json(tmp_path: Path) -> None:
    data = {"url": "memory://x", "group": "g", "topic_config": {"partitions": 4}}
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text("url: memory://x\ngroup: g\ntopic_config:\n  partitions: 4\n")
    for name in ("c.json", "c.yaml"):
        options = load_config(tmp_path / name, environ={}).connect_options()
        assert options["topic_config"].partitions == 4


def test_environment_variables_override_the_file_with_nested_keys(tmp_path: Path) -> None:
    path = tmp_path / "keybus.toml"
    path.write_text(TOML)
    environ = {
        "KEYBUS_GROUP": "payments",
        "KEYBUS_TOPIC_CONFIG__PARTITIONS": "6",
        "KEYBUS_TLS__VERIFY": "false",
        "KEYBUS_OPTIONS": '{"commit_interval": 1.0}',
        "KEYBUS_BACKENDS": "memory",  # someone else's variable: ignored
    }
    config = load_config(path, environ=environ)
    options = config.connect_options()
    assert config.group == "payments"
    assert options["topic_config"].partitions == 6
    assert options["tls"] == keybus.TLS(ca_file="/etc/ca.pem", verify=False)
    assert options["commit_interval"] == 1.0


@pytest.mark.parametrize(
    ("data", "key", "shown"),
    [
        (
            {"url": "memory://", "topic_config": {"partitions": "three"}},
            "topic_config.partitions",
            "'three'",
        ),
        (
            {"url": "memory://", "sasl": {"mechanism": "PLAIN", "username": "u", "password": 7}},
            "sasl.password",
            "**********",
        ),
        ({"url": "memory://", "tls": {"ca_fiel": "x"}}, "tls", ""),
        ({"group": "g"}, "(top)", ""),
    ],
)
def test_a_bad_value_names_its_key_and_masks_secrets(
    data: dict[str, object], key: str, shown: str
) -> None:
    with pytest.raises(keybus.ConfigError) as caught:
        load_config(data, environ={})
    error = caught.value
    assert error.key == key
    assert error.value == shown
    assert isinstance(error, ValueError)
    if key.endswith("password"):
        assert "7" not in str(error), "a secret's value is never shown"


def test_bad_subscription_defaults_and_a_bad_mechanism_fail_at_load() -> None:
    with pytest.raises(keybus.ConfigError, match="max_attempts"):
        load_config({"url": "memory://", "subscribe": {"max_attempts": 0}}, environ={})
    with pytest.raises(keybus.ConfigError, match="mechanism"):
        load_config(
            {"url": "memory://", "sasl": {"mechanism": "GSSAPI", "username": "u", "password": "p"}},
            environ={},
        )
    with pytest.raises(keybus.ConfigError, match="cannot read"):
        load_config("/nonexistent/keybus.toml", environ={})


async def test_connect_from_config_gives_a_bus_with_those_settings(
    no_leaks: LeakChecker, tmp_path: Path
) -> None:
    path = tmp_path / "keybus.toml"
    path.write_text(
        'url = "memory://fromconfig"\ngroup = "billing"\n'
        "[subscribe]\nmax_attempts = 1\n[topic_config]\npartitions = 2\n"
    )
    failures: list[str] = []

    async def failing(message: keybus.Message) -> None:
        failures.append(message.value.decode())
        raise RuntimeError("no")

    async with keybus.connect_from_config(path, environ={}) as bus:
        assert bus.group == "billing"
        sub = await bus.subscribe("orders", failing)
        assert sub.options.max_attempts == 1
        assert (await bus.describe_topic("orders")).partitions == 2
        await bus.publish("orders", b"x", key="k")
        await eventually(lambda: sub.stats().dead_lettered == 1, what="one attempt, dead-lettered")
    assert failures == ["x"]
