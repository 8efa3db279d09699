"""``tls=`` / ``sasl=`` (and URL credentials) become the same librdkafka settings for the
producer, the consumer and the admin client; what librdkafka cannot take is refused with
what to use instead; the password stays out of every repr and error text. (No broker:
``tests/kafka/test_security.py`` connects for real.)"""

from __future__ import annotations

import ssl
from typing import Any

import pytest

import keybus
from keybus.testing import LeakChecker
from keybus.transports.kafka import KafkaTransport
from keybus.transports.kafka.config import KafkaSettings

CANARY = "kafka-password-canary-91c4"
SECURITY_KEYS = ("security.protocol", "ssl.", "sasl.", "enable.ssl", "oauth_cb")


def security(settings: KafkaSettings) -> dict[str, Any]:
    """The security settings of the three clients, checked to be one and the same."""
    found = [
        {k: v for k, v in config.items() if k.startswith(SECURITY_KEYS)}
        for config in (settings.producer, settings.consumer, settings.admin)
    ]
    assert found[0] == found[1] == found[2]
    return found[0]


def test_no_security_options_leave_librdkafka_plaintext() -> None:
    assert security(KafkaSettings(url="kafka://127.0.0.1:9092")) == {}


def test_scram_over_tls_with_a_private_ca() -> None:
    settings = KafkaSettings(
        url="kafka://b1:9093,b2:9093",
        tls=keybus.TLS(ca_file="ca.pem"),
        sasl=keybus.SASL("SCRAM-SHA-512", username="svc", password=CANARY),
    )
    assert security(settings) == {
        "security.protocol": "SASL_SSL",
        "enable.ssl.certificate.verification": True,
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.ca.location": "ca.pem",
        "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": CANARY,
    }
    assert settings.producer["bootstrap.servers"] == "b1:9093,b2:9093"
    assert CANARY not in repr(settings)


def test_mutual_tls_without_verification_and_plain_sasl_without_tls() -> None:
    mtls = KafkaSettings(
        url="kafka://b:9093",
        tls=keybus.TLS(cert_file="c.pem", key_file="k.pem", key_password=CANARY, verify=False),
    )
    assert security(mtls) == {
        "security.protocol": "SSL",
        "enable.ssl.certificate.verification": False,
        "ssl.endpoint.identification.algorithm": "none",
        "ssl.certificate.location": "c.pem",
        "ssl.key.location": "k.pem",
        "ssl.key.password": CANARY,
    }
    assert CANARY not in repr(mtls)
    sasl = keybus.SASL("PLAIN", username="u", password="p")
    plain = KafkaSettings(url="kafka://b:9092", sasl=sasl)
    assert security(plain)["security.protocol"] == "SASL_PLAINTEXT"
    assert security(KafkaSettings(url="kafka://b:9093", tls=True))["security.protocol"] == "SSL"


def test_oauthbearer_calls_the_token_callable() -> None:
    settings = KafkaSettings(
        url="kafka://b:9093",
        tls=True,
        sasl=keybus.SASL("OAUTHBEARER", token=lambda: ("a-token", 1234.5)),
    )
    found = security(settings)
    assert found["sasl.mechanisms"] == "OAUTHBEARER"
    assert found["oauth_cb"]("librdkafka's sasl.oauthbearer.config") == ("a-token", 1234.5)


def test_url_credentials_are_parsed_with_a_mechanism_and_masked() -> None:
    url = f"kafka://svc:{CANARY}@b1:9093,b2:9093?sasl=scram-sha-256"
    transport = KafkaTransport(url, tls=True)
    settings = transport._settings
    assert settings.producer["bootstrap.servers"] == "b1:9093,b2:9093"
    found = security(settings)
    assert (found["sasl.mechanisms"], found["sasl.username"]) == ("SCRAM-SHA-256", "svc")
    assert found["sasl.password"] == CANARY
    assert transport.url == "kafka://svc:**********@b1:9093,b2:9093?sasl=scram-sha-256"
    assert CANARY not in repr(settings)
    # The mechanism may come as the sasl= option instead.
    named = KafkaSettings(url=f"kafka://svc:{CANARY}@b:9092", sasl="PLAIN")
    assert security(named)["sasl.mechanisms"] == "PLAIN"


@pytest.mark.parametrize(
    ("url", "options", "error", "match"),
    [
        (f"kafka://svc:{CANARY}@b:9093", {}, ValueError, r"need a SASL mechanism: add \?sasl="),
        (
            f"kafka://svc:{CANARY}@b:9093",
            {"sasl": keybus.SASL("PLAIN", username="a", password="b")},
            ValueError,
            "in one place",
        ),
        ("kafka://b:9093?sasl=PLAIN", {}, ValueError, "without credentials"),
        ("kafka://b:9093?tls=1", {}, ValueError, "unknown URL parameters"),
        (f"kafka://svc:{CANARY}@b:9093?sasl=GSSAPI", {}, ValueError, "one of"),
        ("kafka://b:9093", {"tls": ssl.create_default_context()}, TypeError, r"keybus\.TLS"),
        ("kafka://b:9093", {"tls": keybus.TLS(server_hostname="x")}, ValueError, "advertises"),
        ("kafka://b:9093", {"tls": "yes"}, TypeError, "tls must be"),
        ("kafka://b:9093", {"sasl": 1}, TypeError, "sasl must be"),
    ],
)
def test_what_librdkafka_cannot_take_is_refused_with_what_to_use(
    url: str, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        KafkaTransport(url, **options)
    assert CANARY not in str(info.value)


async def test_a_connect_error_never_shows_the_password(no_leaks: LeakChecker) -> None:
    # Nothing listens on port 1: the connect fails, naming the URL masked.
    url = f"kafka://svc:{CANARY}@127.0.0.1:1?sasl=PLAIN"
    with pytest.raises(keybus.ConnectError) as info:
        await keybus.connect(url, connect_timeout=1.0)
    assert "svc:**********@127.0.0.1:1" in str(info.value)
    assert CANARY not in str(info.value)
    assert CANARY not in repr(keybus.ConnectError(url, "any reason"))
