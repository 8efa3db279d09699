"""How a NATS bus proves who it is: TLS, and one of user + password, token, NKey seed or
a ``.creds`` file (decentralised auth) — from the options of ``keybus.connect`` and the
credentials in the URL, which are split off (never handed to nats-py, so nats-py never
reports a URL that carries them).

Secrets stay :class:`~keybus.security.Secret` until nats-py needs them: passwords and
tokens are handed over as callables it calls while writing ``CONNECT``. Those callables
also refuse to send a secret in clear when TLS was asked for (``tls=``, ``tls://``) and
the server does not offer it — nats-py itself would just go on without TLS.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keybus.errors import ConnectError
from keybus.security import TLS, Secret, redact_url, split_credentials, tls_settings
from keybus.transports.nats.errors import PlainRefused

__all__ = ["AUTH_OPTIONS", "NatsAuth"]

AUTH_OPTIONS = ("tls", "user", "password", "token", "nkey_seed", "credentials")
"""The keyword arguments of ``keybus.connect("nats://...")`` this module takes."""

_SEED_PREFIX = "SU"  # a user NKey seed; account and operator seeds cannot log in


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """The security settings of one transport (``repr`` shows no secret)."""

    server: str  # the URL nats-py connects to: nats://host:port, no credentials
    tls: ssl.SSLContext | None
    tls_hostname: str | None
    user: str | None
    password: Secret | None
    token: Secret | None
    nkey_seed: Secret | None
    nkey_file: str | None
    credentials: str | None

    @classmethod
    def parse(cls, url: str, options: Mapping[str, Any]) -> NatsAuth:
        """The settings for ``url`` (``nats://`` or ``tls://``) and ``options`` (only
        :data:`AUTH_OPTIONS`); ``ValueError``/``TypeError`` for settings that do not go
        together, ``ConnectError`` for files that cannot be read."""
        shown = redact_url(url)
        clean, url_user, url_password = split_credentials(url)
        user = options.get("user")
        password = Secret.of(options.get("password"))
        token = Secret.of(options.get("token"))
        if url_user is not None:
            if user is not None or password is not None or token is not None:
                raise ValueError("credentials both in the URL and as options: give them once")
            if url_password is None:  # nats://<token>@host
                token = Secret(url_user)
            else:
                user, password = url_user, url_password
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        seed, seed_file = _nkey(options.get("nkey_seed"))
        credentials = options.get("credentials")
        if credentials is not None:
            credentials = os.fspath(credentials)
            if not os.path.isfile(credentials):
                raise ConnectError(shown, f"credentials file {credentials} not found")
        given = [user, token, seed or seed_file, credentials]
        if sum(x is not None for x in given) > 1:
            raise ValueError("give one of user/password, token, nkey_seed or credentials")
        scheme, _, rest = clean.partition("://")
        settings = tls_settings(options.get("tls"))
        if settings is None and scheme.lower() == "tls":
            settings = TLS()  # tls:// means TLS, with the system's CAs by default
        return cls(
            server=f"nats://{rest}",
            tls=_context(settings, shown),
            tls_hostname=settings.server_hostname if isinstance(settings, TLS) else None,
            user=user,
            password=password,
            token=token,
            nkey_seed=seed,
            nkey_file=seed_file,
            credentials=credentials,
        )

    @property
    def tls_required(self) -> bool:
        return self.tls is not None

    def refuses(self, server_info: object) -> bool:
        """Whether the server (its ``INFO``) does not offer the TLS asked for."""
        return (
            self.tls_required
            and isinstance(server_info, dict)
            and not server_info.get("tls_required")
        )

    def client_options(self, server_info: Callable[[], object]) -> dict[str, Any]:
        """nats-py's ``connect`` keyword arguments; ``server_info`` is the ``INFO`` of the
        server being connected to (checked before a password or token is sent)."""
        kwargs: dict[str, Any] = {}
        if self.tls is not None:
            kwargs["tls"] = self.tls
            if self.tls_hostname:
                kwargs["tls_hostname"] = self.tls_hostname
        if self.user is not None and self.password is not None:
            kwargs["user"] = self._guard(Secret(self.user), server_info)
            kwargs["password"] = self._guard(self.password, server_info)
        if self.token is not None:
            kwargs["token"] = self._guard(self.token, server_info)
        if self.nkey_seed is not None:
            kwargs["nkeys_seed_str"] = self.nkey_seed.reveal()
        if self.nkey_file is not None:
            kwargs["nkeys_seed"] = self.nkey_file
        if self.credentials is not None:
            kwargs["user_credentials"] = self.credentials
        return kwargs

    def _guard(self, secret: Secret, server_info: Callable[[], object]) -> Callable[[], str]:
        def reveal() -> str:
            if self.refuses(server_info()):
                raise PlainRefused()
            return secret.reveal()

        return reveal


def _nkey(value: object) -> tuple[Secret | None, str | None]:
    """``nkey_seed``: the seed itself (a ``str`` or ``Secret``, ``SU...``), or a
    ``pathlib.Path`` to a file holding it."""
    if value is None:
        return None, None
    if isinstance(value, Path):
        return None, os.fspath(value)
    if not isinstance(value, str | Secret):
        raise TypeError("nkey_seed must be the seed (str or keybus.Secret) or a pathlib.Path")
    seed = Secret(value)
    if not seed.reveal().strip().startswith(_SEED_PREFIX):
        # Never quote it: it may be a seed of the wrong kind, or one mistyped.
        raise ValueError(
            "nkey_seed is not a user NKey seed (SU...); pass a pathlib.Path to read one from a file"
        )
    return seed, None


def _context(settings: TLS | ssl.SSLContext | None, shown: str) -> ssl.SSLContext | None:
    if settings is None or isinstance(settings, ssl.SSLContext):
        return settings
    try:
        return settings.context()
    except (OSError, ssl.SSLError) as exc:  # a file missing, a key that does not match
        raise ConnectError(shown, f"TLS settings: {exc}") from exc
