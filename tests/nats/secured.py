"""The secured nats-servers of ``tools/nats/secured.sh`` (started by ``make test``): their
endpoints and throw-away secrets, read from the ``secured.json`` the script writes
(``KEYBUS_NATS_SECURED``, default ``.cache/nats/run-secured/secured.json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / ".cache/nats/run-secured/secured.json"


def secured_servers() -> dict[str, dict[str, Any]] | None:
    """Every secured server by name (``auth``, ``token``, ``tls``, ``mtls``, ``creds``),
    or ``None`` when the script has not started them."""
    path = Path(os.environ.get("KEYBUS_NATS_SECURED") or DEFAULT)
    if not path.is_file():
        return None
    servers: dict[str, dict[str, Any]] = json.loads(path.read_text())
    return servers


def require_secured() -> dict[str, dict[str, Any]]:
    """:func:`secured_servers`, or skip the calling test with the reason."""
    servers = secured_servers()
    if servers is None:
        pytest.skip(
            "secured nats-servers are not running (tools/nats/secured.sh up; "
            "KEYBUS_NATS_SECURED names its secured.json)"
        )
    return servers


def with_userinfo(url: str, userinfo: str) -> str:
    """``url`` with credentials in it (``user:password`` or a token)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{userinfo}@{rest}"
