"""Record key and headers as NATS headers, so that any name and any bytes round-trip.

* **Values** that are not plain printable ASCII (or have surrounding spaces, which NATS
  strips) travel base64-encoded; their (wire) names are listed in ``Keybus-B64``.
* **Names** that NATS cannot carry as they are — anything but an RFC 7230 token (``a:b``,
  ``a b``, non-ASCII, the empty name, which nats-py silently drops) — and names that
  NATS or keybus would interpret (``Nats-*``, ``Keybus-*``, case-insensitively) travel as
  ``Keybus-N-<base64url of the UTF-8 name, unpadded>``. So a user header can neither be
  lost nor change what the server does with the message.

Decoding never raises: a record written by someone else with malformed keybus headers is
still delivered, with the undecodable parts kept as they arrived (the core dead-letters
envelopes it cannot read; a raw subscriber sees what was sent).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import re
from collections.abc import Mapping

from nats.aio.msg import Msg

from keybus.message import LazyHeaders

__all__ = ["NatsHeaders", "decode_headers", "decode_key", "encode_headers"]

_KEY_HEADER = "Keybus-Key"
_B64_HEADER = "Keybus-B64"  # JSON list of (wire) header names whose values are base64
_NAME_PREFIX = "Keybus-N-"  # + base64url(name): a header name NATS cannot carry as is
_OWN_HEADERS = frozenset({_KEY_HEADER, _B64_HEADER})
# What nats-py accepts as a header name (RFC 7230 token characters).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_RESERVED_PREFIXES = ("nats-", "keybus-")


def _plain(value: bytes) -> str | None:
    """``value`` as text if NATS carries it unchanged: printable ASCII without a leading
    or trailing space (header lines are stripped, and CR/LF would end them)."""
    if value.isascii():
        text = value.decode()
        if text.isprintable() and text.strip() == text:
            return text
    return None


@functools.lru_cache(maxsize=1024)  # pure, and the same few names come every publish
def _wire_name(name: str) -> str:
    if _TOKEN.fullmatch(name) and not name.lower().startswith(_RESERVED_PREFIXES):
        return name
    encoded = base64.urlsafe_b64encode(name.encode("utf-8", "surrogatepass"))
    return _NAME_PREFIX + encoded.decode().rstrip("=")


def _user_name(wire: str) -> str:
    if not wire.startswith(_NAME_PREFIX):
        return wire
    text = wire[len(_NAME_PREFIX) :]
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        return raw.decode("utf-8", "surrogatepass")
    except (binascii.Error, ValueError):
        return wire  # not ours after all: keep it as it arrived


def encode_headers(key: str | None, headers: Mapping[str, bytes]) -> dict[str, str]:
    """Headers as NATS carries them; see the module docstring."""
    out: dict[str, str] = {}
    encoded: list[str] | None = None
    for name, value in headers.items():
        wire = _wire_name(name)
        text = _plain(value)
        if text is not None:
            out[wire] = text
        else:
            out[wire] = base64.b64encode(value).decode()
            encoded = encoded or []
            encoded.append(wire)
    if key is not None:
        raw = key.encode("utf-8", "surrogatepass")
        if _plain(raw) is not None:
            out[_KEY_HEADER] = key
        else:
            out[_KEY_HEADER] = base64.b64encode(raw).decode()
            encoded = encoded or []
            encoded.append(_KEY_HEADER)
    if encoded:
        out[_B64_HEADER] = json.dumps(encoded)
    return out


def _listed(text: str) -> frozenset[str] | None:
    """The names listed in a ``Keybus-B64`` header; ``None`` if it is malformed."""
    try:
        names = json.loads(text) if text else []
    except ValueError:
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return None
    return frozenset(names)


def decode_headers(msg: Msg) -> tuple[str | None, dict[str, bytes]]:
    """The inverse of :func:`encode_headers`: ``(key, headers)``. Never raises."""
    raw = msg.headers
    if not raw:
        return None, {}
    listed = raw.get(_B64_HEADER)
    if listed is None and not any(name.startswith(_NAME_PREFIX) for name in raw):
        # the common case: everything travelled as is
        return raw.get(_KEY_HEADER), {
            name: value.encode() for name, value in raw.items() if name != _KEY_HEADER
        }
    encoded = _listed(listed) if listed is not None else frozenset()
    if encoded is None:  # written by someone else: deliver the values as they arrived
        encoded = frozenset()
        malformed = listed
    else:
        malformed = None
    headers: dict[str, bytes] = {}
    key: str | None = None
    for name, value in raw.items():
        data = value.encode()
        if name in encoded:
            with contextlib.suppress(binascii.Error, ValueError):  # else: as it arrived
                data = base64.b64decode(value, validate=True)
        if name == _KEY_HEADER:
            try:
                key = data.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                key = value
        elif name not in _OWN_HEADERS:
            headers[_user_name(name)] = data
    if malformed is not None:
        headers[_B64_HEADER] = malformed.encode()  # pass it on rather than guess
    return key, headers


def decode_key(msg: Msg) -> str | None:
    """The record key alone, as :func:`decode_headers` gives it, without decoding every
    header when the key travelled as is (no ``Keybus-B64`` list)."""
    raw = msg.headers
    if not raw:
        return None
    if _B64_HEADER not in raw:
        return raw.get(_KEY_HEADER)
    return decode_headers(msg)[0]


class NatsHeaders(LazyHeaders):
    """A delivered message's user headers (:func:`decode_headers`), decoded on first
    use: envelope subscriptions never read them, and decoding cost ~2.8 µs a message."""

    __slots__ = ()

    def _load(self) -> dict[str, bytes]:
        return decode_headers(self._source)[1]
