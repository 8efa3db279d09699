"""Secured connections, once per bus: TLS and SASL settings, secrets that never show, and
URLs with their credentials redacted.

Backends translate these into their client's terms (Kafka: librdkafka's ``security.*``
/ ``ssl.*`` / ``sasl.*`` settings for producer, consumer and admin alike; NATS: an
``ssl.SSLContext`` and nats-py's credentials). A secret is a :class:`Secret` from the
moment it is read: its ``repr``/``str`` are masked, so it cannot slip into a log line, an
exception text or a ``repr`` of something holding it; only :meth:`Secret.reveal` hands
out the value, at the one place a client library needs it.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

__all__ = ["SASL", "TLS", "Secret", "redact_url", "split_credentials", "tls_settings"]

_MASK = "**********"


class Secret:
    """A password, token or key seed: masked wherever it would be shown."""

    __slots__ = ("_value",)

    def __init__(self, value: str | Secret) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if type(value) is not str:
            raise TypeError(f"a secret must be a str, got {type(value).__name__}")
        self._value = value

    @classmethod
    def of(cls, value: str | Secret | None) -> Secret | None:
        """``value`` as a Secret (``None`` stays ``None``)."""
        return None if value is None else cls(value)

    def reveal(self) -> str:
        """The value itself: only where a client library needs it."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("keybus.Secret", self._value))

    def __repr__(self) -> str:
        return f"Secret('{_MASK}')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would write the value out in clear: refuse, as a masked repr would.
        raise TypeError("a keybus.Secret is not picklable")


@dataclass(frozen=True, slots=True, kw_only=True)
class TLS:
    """TLS to the broker: a private CA (``ca_file``), a client certificate and key
    (``cert_file``, ``key_file``, ``key_password``), whether to verify the server
    (``verify``; off only for tests) and the name to verify it as (``server_hostname``,
    default the host in the URL). ``tls=True`` means ``TLS()``: the system's CAs."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: Secret | None = None
    verify: bool = True
    server_hostname: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS: cert_file and key_file go together")
        if self.key_password is not None and not isinstance(self.key_password, Secret):
            object.__setattr__(self, "key_password", Secret(self.key_password))

    def context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` for a client (NATS)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cert_file is not None:
            password = self.key_password.reveal() if self.key_password else None
            context.load_cert_chain(self.cert_file, self.key_file, password=password)
        return context


Mechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


@dataclass(frozen=True, slots=True)
class SASL:
    """SASL authentication (Kafka): ``SASL("SCRAM-SHA-512", username="svc",
    password=...)``; ``OAUTHBEARER`` takes ``token`` — a callable returning ``(token,
    expires_at_unix_seconds)``, called when librdkafka needs a token — instead."""

    mechanism: Mechanism
    username: str | None = None
    password: Secret | None = None
    token: Callable[[], tuple[str, float]] | None = None

    def __post_init__(self) -> None:
        if self.mechanism not in _MECHANISMS:
            raise ValueError(f"SASL mechanism must be one of {_MECHANISMS}, got {self.mechanism!r}")
        if self.password is not None and not isinstance(self.password, Secret):
            object.__setattr__(self, "password", Secret(self.password))
        if self.mechanism == "OAUTHBEARER":
            if self.token is None:
                raise ValueError(
                    "SASL OAUTHBEARER needs token=<callable returning (token, expiry)>"
                )
        elif not self.username or self.password is None:
            raise ValueError(f"SASL {self.mechanism} needs username and password")


def tls_settings(value: object) -> TLS | ssl.SSLContext | None:
    """The ``tls=`` option, checked: ``None``/``False`` (plain), ``True`` (``TLS()``), a
    :class:`TLS` or an ``ssl.SSLContext`` (used as it is, where the client takes one)."""
    if value is None or value is False:
        return None
    if value is True:
        return TLS()
    if isinstance(value, TLS | ssl.SSLContext):
        return value
    raise TypeError(f"tls must be True, a keybus.TLS or an ssl.SSLContext, got {value!r}")


def split_credentials(url: str) -> tuple[str, str | None, Secret | None]:
    """``scheme://user:password@host...`` -> (the URL without them, user, password). A
    user alone (``nats://token@host``) comes back as the user, unmasked: the caller
    decides whether it is a token (and wraps it)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, hosts, parts.path, parts.query, parts.fragment))
    return clean, unquote(user) or None, Secret(unquote(password)) if sep else None


def redact_url(url: str) -> str:
    """``url`` with any credentials in it masked, for logs, reprs and error texts."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, sep, _ = userinfo.partition(":")
    # A user alone may be a token (nats://<token>@host): mask it too.
    shown = f"{quote(unquote(user), safe='')}:{_MASK}" if sep else _MASK
    return urlunsplit((parts.scheme, f"{shown}@{hosts}", parts.path, parts.query, parts.fragment))
