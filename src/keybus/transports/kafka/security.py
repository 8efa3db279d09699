"""The ``tls=`` / ``sasl=`` options and URL credentials, in librdkafka's terms.

One translation for the producer, the consumer and the admin client alike. Secrets stay
:class:`~keybus.security.Secret` until :func:`librdkafka_security` builds the settings
dict, the one place librdkafka needs them in clear (that dict is never logged or shown:
``KafkaSettings`` keeps it out of its ``repr``; librdkafka itself prints
``sasl.password`` and ``ssl.key.password`` as ``[redacted]`` even at ``debug=all``).

URL credentials, ``kafka://user:password@host:9093?sasl=SCRAM-SHA-512``, are parsed, not
passed through: they need a SASL mechanism, from the URL's ``sasl`` query parameter or a
mechanism name as the ``sasl=`` option (``sasl="PLAIN"``); without one they are refused
(they would otherwise become a bootstrap address, and librdkafka would print it).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from keybus.security import (
    SASL,
    TLS,
    Mechanism,
    Secret,
    redact_url,
    split_credentials,
    tls_settings,
)

__all__ = ["Security", "librdkafka_security", "parse_security"]

_SSL_CONTEXT = (
    "tls: an ssl.SSLContext cannot be given to Kafka (librdkafka does its own TLS and takes "
    "files, not a context); use keybus.TLS(ca_file=..., cert_file=..., key_file=...)"
)


@dataclass(frozen=True, slots=True)
class Security:
    """A Kafka URL's parts that matter here, and the checked ``tls`` / ``sasl``."""

    url: str
    """The URL as shown: credentials masked (:func:`~keybus.security.redact_url`)."""
    bare_url: str
    """The URL without credentials: where the bootstrap servers are read from."""
    tls: TLS | None
    sasl: SASL | None


def parse_security(url: str, tls: object, sasl: object) -> Security:
    """Check ``tls`` and ``sasl`` and take the credentials out of ``url``. A ``sasl`` that
    is a mechanism name (or the URL's ``?sasl=``) takes its user and password from the
    URL."""
    shown = redact_url(url)
    bare, user, password = split_credentials(url)
    mechanism = _url_mechanism(bare, shown)
    if isinstance(sasl, str):
        mechanism, sasl = sasl.upper(), None
    if sasl is not None and not isinstance(sasl, SASL):
        raise TypeError(f"sasl must be a keybus.SASL or a mechanism name, got {sasl!r}")
    if user is not None:
        if sasl is not None:
            raise ValueError(
                f"{shown}: credentials both in the URL and in sasl=: give them in one place"
            )
        if mechanism is None:
            raise ValueError(
                f"{shown}: a user and password in a Kafka URL need a SASL mechanism: add "
                "?sasl=SCRAM-SHA-512 (or PLAIN, SCRAM-SHA-256) to the URL, or pass "
                "sasl='SCRAM-SHA-512', or sasl=keybus.SASL(...) and no credentials in the URL"
            )
        sasl = SASL(cast(Mechanism, mechanism), username=user, password=password)
    elif mechanism is not None and sasl is None:
        raise ValueError(
            f"{shown}: SASL mechanism {mechanism} without credentials: put user:password@ "
            "in the URL, or pass sasl=keybus.SASL(...)"
        )
    return Security(shown, bare, _tls(tls), sasl)


def _url_mechanism(bare: str, shown: str) -> str | None:
    query = parse_qs(urlsplit(bare).query)
    unknown = set(query) - {"sasl"}
    if unknown:
        raise ValueError(f"{shown}: unknown URL parameters {sorted(unknown)} (only sasl=)")
    values = query.get("sasl")
    return values[-1].upper() if values else None


def _tls(value: object) -> TLS | None:
    """``keybus.security.tls_settings``, less what librdkafka cannot take."""
    if isinstance(value, ssl.SSLContext):
        raise TypeError(_SSL_CONTEXT)
    try:
        checked = tls_settings(value)
    except TypeError:  # (its message offers an ssl.SSLContext)
        raise TypeError(
            f"tls must be True, False or a keybus.TLS on Kafka, got {value!r}"
        ) from None
    assert not isinstance(checked, ssl.SSLContext)
    if checked is not None and checked.server_hostname is not None:
        raise ValueError(
            "tls: server_hostname is not supported on Kafka: librdkafka verifies each "
            "broker as the host name it advertises"
        )
    return checked


def librdkafka_security(tls: TLS | None, sasl: SASL | None) -> dict[str, Any]:
    """librdkafka's ``security.protocol``, ``ssl.*`` and ``sasl.*`` settings (and an
    ``oauth_cb`` for OAUTHBEARER), secrets revealed: for the client configs only."""
    if tls is None and sasl is None:
        return {}  # librdkafka's PLAINTEXT default (or whatever the user's configs say)
    protocol = {(True, True): "SASL_SSL", (True, False): "SSL", (False, True): "SASL_PLAINTEXT"}
    out: dict[str, Any] = {"security.protocol": protocol[tls is not None, sasl is not None]}
    if tls is not None:
        out["enable.ssl.certificate.verification"] = tls.verify
        # Verify the broker's host name too (librdkafka's default, said out loud), unless
        # verification is off altogether.
        out["ssl.endpoint.identification.algorithm"] = "https" if tls.verify else "none"
        for name, value in (
            ("ssl.ca.location", tls.ca_file),
            ("ssl.certificate.location", tls.cert_file),
            ("ssl.key.location", tls.key_file),
        ):
            if value is not None:
                out[name] = value
        if tls.key_password is not None:
            out["ssl.key.password"] = tls.key_password.reveal()
    if sasl is not None:
        out["sasl.mechanisms"] = sasl.mechanism
        if sasl.mechanism == "OAUTHBEARER":
            assert sasl.token is not None  # SASL checks it
            out["oauth_cb"] = _oauth(sasl.token)
        else:
            # (SASL checks both are there.)
            assert sasl.username is not None
            assert sasl.password is not None
            out["sasl.username"] = sasl.username
            out["sasl.password"] = sasl.password.reveal()
    return out


def _oauth(token: Callable[[], tuple[str, float]]) -> Callable[[str], tuple[str, float]]:
    """librdkafka's ``oauth_cb(sasl.oauthbearer.config)``, from ``SASL.token``: called on
    the client's polling thread when a token is needed or about to expire. An exception
    it raises is librdkafka's token failure (reported, retried)."""

    def oauth_cb(_config: str) -> tuple[str, float]:
        value, expires = token()
        if isinstance(value, Secret):
            value = value.reveal()
        return value, float(expires)

    return oauth_cb
