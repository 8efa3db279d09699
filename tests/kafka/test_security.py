"""Secured Kafka listeners, for real (``tools/kafka/secured.sh``): every auth path
connects, publishes and receives; a wrong secret, an untrusted certificate or a TLS/plain
mismatch is a ``ConnectError`` naming the cause within the connect's timeout; no secret
shows in the error, the logs (keybus's and librdkafka's as forwarded), ``bus.url`` or a
repr."""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import pytest

import keybus
from keybus.bench.scenario import backend_url
from keybus.security import redact_url
from keybus.testing import LeakChecker
from tests.conftest import Backend, unique
from tests.helpers import Collected, eventually
from tests.kafka.secured import SecuredKafka, secured_file, secured_kafka

CANARY = "wrong-secret-canary-5e1d"


@pytest.fixture
def secured(caplog: pytest.LogCaptureFixture) -> SecuredKafka:
    found = secured_kafka()
    if found is None:
        pytest.skip(f"the test broker has no secured listeners ({secured_file()} is missing)")
    # Everything keybus and librdkafka log, to look for secrets in.
    caplog.set_level(logging.DEBUG, logger="keybus")
    return found


def unsigned_token() -> tuple[str, float]:
    """An OAUTHBEARER token the test broker's default (unsecured) validator accepts."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = time.time()
    claims = {"sub": "svc", "iat": int(now), "exp": int(now) + 3600}
    return f"{part({'alg': 'none'})}.{part(claims)}.", now + 3600


def with_credentials(url: str, user: str, password: str, mechanism: str) -> str:
    return url.replace("://", f"://{user}:{password}@", 1) + f"?sasl={mechanism}"


Path = Callable[[SecuredKafka], tuple[str, dict[str, Any]]]

AUTH_PATHS: dict[str, Path] = {
    "tls": lambda s: (s.ssl, {"tls": s.tls()}),
    "mutual-tls": lambda s: (s.mtls, {"tls": s.tls(client_certificate=True)}),
    "sasl-ssl-scram-sha-512": lambda s: (s.sasl_ssl, {"tls": s.tls(), "sasl": s.scram}),
    # Confluent Cloud's way: PLAIN (API key and secret) over TLS.
    "sasl-ssl-plain": lambda s: (s.sasl_ssl, {"tls": s.tls(), "sasl": s.plain}),
    "sasl-plaintext-plain": lambda s: (s.sasl_plaintext, {"sasl": s.plain}),
    "url-credentials": lambda s: (
        with_credentials(s.sasl_ssl, "svc", s.secrets[0], "SCRAM-SHA-512"),
        {"tls": s.tls()},
    ),
    "oauthbearer": lambda s: (
        s.sasl_plaintext,
        {"sasl": keybus.SASL("OAUTHBEARER", token=unsigned_token)},
    ),
}


def assert_nothing_shows(secrets: list[str], *texts: str) -> None:
    for secret in secrets:
        shown = [text[:200] for text in texts if secret in text]
        assert not shown, f"a secret shows in {shown}"


@pytest.mark.parametrize("path", sorted(AUTH_PATHS))
async def test_each_auth_path_publishes_and_subscribes(
    no_leaks: LeakChecker,
    backend: Backend,
    secured: SecuredKafka,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    url, options = AUTH_PATHS[path](secured)
    topic = backend.topic("secured")  # deleted over the plain listener afterwards
    got = Collected()
    async with keybus.connect(url, group=unique("secured-g"), **options) as bus:
        await bus.subscribe(topic, got)
        await bus.publish(topic, b"over " + path.encode(), key="k")
        await eventually(lambda: len(got) == 1, timeout=20.0, what="the message back")
        shown = [bus.url, repr(bus)]
    assert got.values() == [b"over " + path.encode()]
    assert_nothing_shows(secured.secrets, *shown, caplog.text)


def _wrong_scram(s: SecuredKafka) -> tuple[str, dict[str, Any]]:
    sasl = keybus.SASL("SCRAM-SHA-512", username="svc", password=CANARY)
    return s.sasl_ssl, {"tls": s.tls(), "sasl": sasl}


def _wrong_plain(s: SecuredKafka) -> tuple[str, dict[str, Any]]:
    return s.sasl_plaintext, {"sasl": keybus.SASL("PLAIN", username="svc", password=CANARY)}


# path -> (URL and options, what the reason says, at most how long it may take)
WRONG: dict[str, tuple[Path, str, float]] = {
    "wrong-scram-password": (_wrong_scram, "authentication failed", 3.0),
    "wrong-plain-password": (_wrong_plain, "authentication failed", 3.0),
    "wrong-password-in-url": (
        lambda s: (with_credentials(s.sasl_plaintext, "svc", CANARY, "PLAIN"), {}),
        "authentication failed",
        3.0,
    ),
    "untrusted-certificate": (lambda s: (s.ssl, {"tls": True}), "certificate verify failed", 3.0),
    "no-client-certificate": (
        lambda s: (s.mtls, {"tls": s.tls()}),
        "TLS handshake failed.*bad certificate",
        3.0,
    ),
    "tls-to-a-plain-listener": (
        lambda s: (s.ssl.rsplit(":", 1)[0] + f":{_plain_port()}", {"tls": s.tls()}),
        "TLS handshake failed.*PLAINTEXT broker listener",
        3.0,
    ),
    # The listener only hangs up: this one waits for the probe (connect_timeout below).
    "plain-to-a-tls-listener": (lambda s: (s.ssl, {}), "is this a TLS or SASL listener", 6.0),
    "plain-to-a-sasl-listener": (
        lambda s: (s.sasl_plaintext, {}),
        "is this a TLS or SASL listener",
        6.0,
    ),
}


def _plain_port() -> int:
    return int(backend_url("kafka").rsplit(":", 1)[1])


@pytest.mark.parametrize("case", sorted(WRONG))
async def test_a_wrong_secret_or_tls_mismatch_is_a_connect_error_naming_the_cause(
    no_leaks: LeakChecker, secured: SecuredKafka, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    make, reason, bound = WRONG[case]
    url, options = make(secured)
    started = time.monotonic()
    with pytest.raises(keybus.ConnectError, match=reason) as info:
        await keybus.connect(url, connect_timeout=5.0, **options)
    assert time.monotonic() - started < bound
    error = info.value
    assert error.url == redact_url(url)
    assert error.url in str(error)
    assert_nothing_shows([CANARY, *secured.secrets], str(error), repr(error), caplog.text)


async def test_an_ssl_context_is_refused_on_kafka_with_what_to_use(
    no_leaks: LeakChecker, secured: SecuredKafka
) -> None:
    with pytest.raises(TypeError, match=r"keybus\.TLS\(ca_file="):
        await keybus.connect(secured.ssl, tls=ssl.create_default_context())
