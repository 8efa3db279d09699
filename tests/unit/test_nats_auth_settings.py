"""NATS security settings without a server: what goes together, what is refused (never
quoting a secret), URL credentials split off and the URL shown redacted everywhere."""

from __future__ import annotations

import pathlib

import pytest

import keybus
from keybus.testing import LeakChecker
from keybus.transports.nats import NatsTransport
from keybus.transports.nats.auth import NatsAuth
from keybus.transports.nats.errors import PlainRefused

CANARY = "kb-canary-unit"


def test_url_credentials_become_options_and_the_url_is_shown_masked() -> None:
    transport = NatsTransport(f"nats://svc:{CANARY}@127.0.0.1:1")
    assert transport.url == "nats://svc:**********@127.0.0.1:1"
    auth = NatsAuth.parse(f"tls://{CANARY}@127.0.0.1:1", {})
    assert auth.server == "nats://127.0.0.1:1"  # nats-py never sees the credentials
    assert auth.token is not None
    assert auth.token.reveal() == CANARY
    assert auth.tls_required  # tls:// means TLS
    assert CANARY not in repr(auth)
    options = auth.client_options(lambda: {"tls_required": True})
    assert options["token"]() == CANARY
    with pytest.raises(PlainRefused):
        auth.client_options(lambda: {"tls_required": False})["token"]()


def test_conflicting_or_malformed_settings_are_refused_without_quoting_them() -> None:
    seed = f"SA{CANARY}"
    with pytest.raises(ValueError, match="once"):
        NatsTransport(f"nats://svc:{CANARY}@127.0.0.1:1", user="svc", password="pw")
    with pytest.raises(ValueError, match="go together"):
        NatsTransport("nats://127.0.0.1:1", user="svc")
    with pytest.raises(ValueError, match="one of"):
        NatsTransport("nats://127.0.0.1:1", token=CANARY, nkey_seed="SU" + "A" * 56)
    with pytest.raises(ValueError, match="not a user NKey seed") as malformed:
        NatsTransport("nats://127.0.0.1:1", nkey_seed=seed)
    assert CANARY not in str(malformed.value)
    with pytest.raises(TypeError, match=r"pathlib\.Path"):
        NatsTransport("nats://127.0.0.1:1", nkey_seed=b"SU")
    assert NatsAuth.parse("nats://h:1", {"nkey_seed": pathlib.Path("/x.nk")}).nkey_file == "/x.nk"
    with pytest.raises(keybus.ConnectError, match="not found"):
        NatsTransport("tls://127.0.0.1:1", credentials="/nonexistent/svc.creds")
    with pytest.raises(keybus.ConnectError, match="TLS settings"):
        NatsTransport("tls://127.0.0.1:1", tls=keybus.TLS(ca_file="/nonexistent/ca.pem"))
    with pytest.raises(TypeError, match="tls must be"):
        NatsTransport("nats://127.0.0.1:1", tls="yes")


async def test_a_connect_error_never_quotes_url_credentials(no_leaks: LeakChecker) -> None:
    with pytest.raises(keybus.ConnectError) as unknown:
        await keybus.connect(f"nosuch://svc:{CANARY}@127.0.0.1:1")
    assert CANARY not in str(unknown.value)
    assert "svc:**********@" in str(unknown.value)
    assert CANARY not in keybus.ConnectError(f"nats://{CANARY}@h:1", "why").url
