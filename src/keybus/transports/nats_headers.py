"""Record key and headers as NATS headers, so that any bytes round-trip."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping

from nats.aio.msg import Msg

__all__ = ["decode_headers", "encode_headers"]

_KEY_HEADER = "Keybus-Key"
_B64_HEADER = "Keybus-B64"  # JSON list of header names whose values travel base64-encoded
_OWN_HEADERS = frozenset({_KEY_HEADER, _B64_HEADER})


def _plain(value: bytes) -> str | None:
    """``value`` as text if NATS carries it unchanged: printable ASCII without a leading
    or trailing space (header lines are stripped, and CR/LF would end them)."""
    if value.isascii():
        text = value.decode()
        if text.isprintable() and text.strip() == text:
            return text
    return None


def encode_headers(key: str | None, headers: Mapping[str, bytes]) -> dict[str, str]:
    """Headers as NATS carries them; values that are not plain printable ASCII travel
    base64-encoded and are listed in ``Keybus-B64``, so any bytes round-trip."""
    out: dict[str, str] = {}
    encoded: list[str] | None = None
    for name, value in headers.items():
        text = _plain(value)
        if text is not None:
            out[name] = text
        else:
            out[name] = base64.b64encode(value).decode()
            encoded = encoded or []
            encoded.append(name)
    if key is not None:
        raw = key.encode()
        if _plain(raw) is not None:
            out[_KEY_HEADER] = key
        else:
            out[_KEY_HEADER] = base64.b64encode(raw).decode()
            encoded = encoded or []
            encoded.append(_KEY_HEADER)
    if encoded:
        out[_B64_HEADER] = json.dumps(encoded)
    return out


def decode_headers(msg: Msg) -> tuple[str | None, dict[str, bytes]]:
    """The inverse of :func:`encode_headers`: ``(key, headers)``."""
    raw = msg.headers
    if not raw:
        return None, {}
    listed = raw.get(_B64_HEADER)
    if listed is None:  # the common case: everything travelled as is
        return raw.get(_KEY_HEADER), {
            name: value.encode() for name, value in raw.items() if name != _KEY_HEADER
        }
    encoded: frozenset[str] = frozenset(json.loads(listed)) if listed else frozenset()
    headers: dict[str, bytes] = {}
    key: str | None = None
    for name, value in raw.items():
        data = base64.b64decode(value) if name in encoded else value.encode()
        if name == _KEY_HEADER:
            key = data.decode()
        elif name not in _OWN_HEADERS:
            headers[name] = data
    return key, headers
