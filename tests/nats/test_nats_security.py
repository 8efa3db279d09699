"""NATS secured connections, on the real servers of ``tools/nats/secured.sh``: every way
to authenticate (user + password, token, NKey seed, ``.creds``, TLS with a private CA
and with a client certificate) does a publish/subscribe round trip; a wrong secret, an
untrusted certificate or a TLS/plain mismatch is a ``ConnectError`` naming the cause,
well within ``connect_timeout``; and no secret shows in logs, reprs or error texts."""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

import keybus
from keybus.testing import LeakChecker
from keybus.testing.conformance import unique
from tests.helpers import drop_topics, eventually
from tests.nats.secured import require_secured, with_userinfo

CONNECT_TIMEOUT = 5.0
# Each refusal is final at the first attempt: no retry, no waiting out the deadline.
REFUSED_WITHIN = 2.0

Way = tuple[str, dict[str, Any]]


def ways(servers: dict[str, dict[str, Any]]) -> dict[str, Way]:
    """Every way to connect: the URL and the options of ``keybus.connect``."""
    auth, token, tls, mtls, creds = (servers[n] for n in ("auth", "token", "tls", "mtls", "creds"))
    return {
        "password": (auth["url"], {"user": auth["user"], "password": auth["password"]}),
        "password-in-url": (with_userinfo(auth["url"], f"svc:{auth['password']}"), {}),
        "nkey-seed": (auth["url"], {"nkey_seed": auth["nkey_seed"]}),
        "nkey-seed-file": (auth["url"], {"nkey_seed": Path(auth["nkey_seed_file"])}),
        "token": (token["url"], {"token": keybus.Secret(token["token"])}),
        "token-in-url": (with_userinfo(token["url"], token["token"]), {}),
        "tls-private-ca": (
            tls["url"],
            {"tls": keybus.TLS(ca_file=tls["ca_file"]), "user": "svc", "password": tls["password"]},
        ),
        "tls-ssl-context": (
            tls["url"].replace("tls://", "nats://"),
            {
                "tls": ssl.create_default_context(cafile=tls["ca_file"]),
                "user": "svc",
                "password": tls["password"],
            },
        ),
        "tls-client-certificate": (
            mtls["url"],
            {
                "tls": keybus.TLS(
                    ca_file=mtls["ca_file"], cert_file=mtls["cert_file"], key_file=mtls["key_file"]
                )
            },
        ),
        "creds": (
            creds["url"],
            {"tls": keybus.TLS(ca_file=creds["ca_file"]), "credentials": creds["credentials"]},
        ),
    }


def wrong(servers: dict[str, dict[str, Any]]) -> dict[str, tuple[str, dict[str, Any], str]]:
    """Ways that must fail: the URL, the options and the cause the error names."""
    auth, token, tls, mtls, creds = (servers[n] for n in ("auth", "token", "tls", "mtls", "creds"))
    violation = "authorization violation"
    ca = keybus.TLS(ca_file=tls["ca_file"])
    return {
        "wrong-password": (
            auth["url"],
            {"user": "svc", "password": auth["password"][::-1]},
            violation,
        ),
        "wrong-password-in-url": (
            with_userinfo(auth["url"], f"svc:{auth['password'][::-1]}"),
            {},
            violation,
        ),
        "unknown-nkey": (auth["url"], {"nkey_seed": auth["stranger_seed"]}, violation),
        "wrong-token": (token["url"], {"token": token["token"][::-1]}, violation),
        "no-credentials": (token["url"], {}, violation),
        "creds-of-an-unknown-account": (
            creds["url"],
            {"tls": ca, "credentials": creds["stranger_credentials"]},
            violation,
        ),
        "untrusted-certificate": (
            tls["url"],
            {"user": "svc", "password": tls["password"]},
            "certificate verify failed",
        ),
        "plain-client-tls-server": (
            tls["url"].replace("tls://", "nats://"),
            {"user": "svc", "password": tls["password"]},
            "the server requires TLS",
        ),
        "tls-client-plain-server": (
            auth["url"].replace("nats://", "tls://"),
            {"tls": ca, "user": "svc", "password": auth["password"]},
            "does not offer TLS",
        ),
        "no-client-certificate": (mtls["url"], {"tls": ca}, "certificate required"),
    }


def secrets(servers: dict[str, dict[str, Any]]) -> list[str]:
    """Every secret the servers hold: none may be shown anywhere."""
    auth = servers["auth"]
    found = [auth["password"], auth["nkey_seed"], auth["stranger_seed"], servers["token"]["token"]]
    for path in (servers["creds"]["credentials"], servers["creds"]["stranger_credentials"]):
        lines = Path(path).read_text().splitlines()
        found += [line for line in lines if line.startswith("SU")]  # the user's seed
    found += [s[::-1] for s in found]  # the wrong ones the tests give
    return found


def assert_nothing_secret(servers: dict[str, dict[str, Any]], *shown: str) -> None:
    leaks = [
        (secret[:12] + "...", text[:200])
        for secret in secrets(servers)
        for text in shown
        if secret in text
    ]
    assert not leaks


@pytest.fixture(autouse=True)
def debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)


WAYS = [
    "password",
    "password-in-url",
    "nkey-seed",
    "nkey-seed-file",
    "token",
    "token-in-url",
    "tls-private-ca",
    "tls-ssl-context",
    "tls-client-certificate",
    "creds",
]


@pytest.mark.parametrize("way", WAYS)
async def test_each_way_to_authenticate_publishes_and_subscribes(
    way: str,
    no_leaks: LeakChecker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    servers = require_secured()
    # The private CA comes from the options alone, never from the environment.
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    url, options = ways(servers)[way]
    topic = unique("secured")
    received: list[bytes] = []

    async def handler(message: keybus.Message) -> None:
        received.append(message.value)

    bus = await keybus.connect(url, group="secured", connect_timeout=CONNECT_TIMEOUT, **options)
    try:
        await bus.subscribe(topic, handler)
        await bus.publish(topic, b"over a secured connection", key="k")
        await eventually(lambda: received == [b"over a secured connection"], what="the round trip")
        shown = [repr(bus), bus.url]
    finally:
        await drop_topics(bus, topic)
        await bus.close(timeout=2.0)
    assert "@" not in bus.url or "**********@" in bus.url
    assert_nothing_secret(servers, caplog.text, *shown)


@pytest.mark.parametrize(
    "case",
    [
        "wrong-password",
        "wrong-password-in-url",
        "unknown-nkey",
        "wrong-token",
        "no-credentials",
        "creds-of-an-unknown-account",
        "untrusted-certificate",
        "plain-client-tls-server",
        "tls-client-plain-server",
        "no-client-certificate",
    ],
)
async def test_a_refused_connection_names_its_cause_at_once_and_no_secret(
    case: str, no_leaks: LeakChecker, caplog: pytest.LogCaptureFixture
) -> None:
    servers = require_secured()
    url, options, cause = wrong(servers)[case]
    began = time.monotonic()
    with pytest.raises(keybus.ConnectError) as raised:
        await keybus.connect(url, connect_timeout=CONNECT_TIMEOUT, **options)
    elapsed = time.monotonic() - began
    assert cause in str(raised.value)
    assert url.split("@")[-1].split("://")[-1] in str(raised.value)  # names the server
    assert elapsed < REFUSED_WITHIN, f"refused after {elapsed:.2f} s"
    chain = [str(raised.value), repr(raised.value), str(raised.value.__cause__)]
    assert_nothing_secret(servers, caplog.text, *chain)
