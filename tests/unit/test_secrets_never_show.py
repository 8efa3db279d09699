"""A secret is masked wherever it would be shown, and URLs lose their credentials before
anything prints them."""

from __future__ import annotations

import logging
import pickle

import pytest

import keybus
from keybus.security import redact_url, split_credentials

CANARY = "hunter2-canary"


def test_a_secret_is_masked_in_repr_str_format_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    secret = keybus.Secret(CANARY)
    caplog.set_level(logging.DEBUG)
    logging.getLogger("keybus").debug("secret %s %r", secret, secret)
    shown = [repr(secret), str(secret), f"{secret}", f"{secret!r}", caplog.text]
    shown.append(repr(keybus.SASL("PLAIN", username="svc", password=CANARY)))
    shown.append(repr(keybus.TLS(key_password=keybus.Secret(CANARY), cert_file="c", key_file="k")))
    assert not [s for s in shown if CANARY in s]
    assert secret.reveal() == CANARY
    assert secret == keybus.Secret(CANARY)
    with pytest.raises(TypeError):
        pickle.dumps(secret)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://svc:" + CANARY + "@127.0.0.1:4222", "nats://svc:**********@127.0.0.1:4222"),
        ("nats://" + CANARY + "@127.0.0.1:4222", "nats://**********@127.0.0.1:4222"),
        ("kafka://svc:" + CANARY + "@h1:9092,h2:9092", "kafka://svc:**********@h1:9092,h2:9092"),
        ("kafka://h1:9092", "kafka://h1:9092"),
    ],
)
def test_urls_are_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_url_credentials_are_split_off_as_a_secret() -> None:
    url, user, password = split_credentials("nats://svc:p%40ss@127.0.0.1:4222")
    assert (url, user) == ("nats://127.0.0.1:4222", "svc")
    assert password is not None
    assert password.reveal() == "p@ss"


def test_bad_security_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="username and password"):
        keybus.SASL("SCRAM-SHA-512", username="svc")
    with pytest.raises(ValueError, match="one of"):
        keybus.SASL("GSSAPI", username="a", password="b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="go together"):
        keybus.TLS(cert_file="c.pem")
