"""Which transport serves which URL scheme.

The built-in backends are named by import path and imported only when a URL asks for
them, so ``import keybus`` loads no client library (and no ``keybus.transports``
module). A third-party transport registers its scheme with :func:`register_transport`
and proves itself with the conformance kit (``keybus.testing.conformance``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from keybus.errors import ConnectError

if TYPE_CHECKING:
    from keybus.transports.base import Transport

__all__ = ["TransportFactory", "make_transport", "register_transport", "schemes"]

TransportFactory = Callable[..., "Transport"]
"""``factory(url, **options) -> Transport`` (not yet connected); unknown options raise
``TypeError``."""

# scheme -> "module:attribute" (imported on first use) or a factory; and the extra that
# brings a built-in backend's client library, for the error that says how to get it.
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "memory": ("keybus.transports.memory:MemoryTransport", None),
    "kafka": ("keybus.transports.kafka:KafkaTransport", "kafka"),
    "nats": ("keybus.transports.nats:NatsTransport", "nats"),
    "tls": ("keybus.transports.nats:NatsTransport", "nats"),  # NATS, TLS required
}
_registered: dict[str, TransportFactory] = {}


def register_transport(scheme: str, factory: TransportFactory) -> None:
    """Serve ``scheme://`` URLs with ``factory(url, **options)``."""
    if not scheme.isidentifier() or scheme != scheme.lower():
        raise ValueError(f"invalid scheme {scheme!r}: use lower-case letters, digits and _")
    if not callable(factory):
        raise TypeError("factory must be callable")
    _registered[scheme] = factory


def schemes() -> list[str]:
    """Every scheme :func:`keybus.connect` knows."""
    return sorted({*_BUILTIN, *_registered})


def _factory(url: str, scheme: str) -> TransportFactory:
    factory = _registered.get(scheme)
    if factory is not None:
        return factory
    builtin = _BUILTIN.get(scheme)
    if builtin is None:
        known = ", ".join(f"{s}://" for s in schemes())
        raise ConnectError(url, f"unknown scheme {scheme!r}: use {known}")
    path, extra = builtin
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f" (pip install 'keybus[{extra}]')" if extra else ""
        raise ConnectError(url, f"the {scheme} backend is not available: {exc}{hint}") from exc
    found: TransportFactory = getattr(module, attribute)
    return found


def make_transport(url: str, scheme: str, options: dict[str, Any]) -> Transport:
    """A transport for ``url`` (not yet connected)."""
    return _factory(url, scheme)(url, **options)
