"""Why a client cannot reach the brokers, as librdkafka reported it.

librdkafka retries a broker connection forever and tells a request only that it timed
out; the cause (a wrong password, an untrusted certificate, TLS spoken to a plain
listener) goes to the client's ``error_cb`` and its log. :class:`ConnectionFailures`
listens to both for the admin client, so the connect probe can fail at once on a
failure no retry cures (authentication, the TLS handshake) and name the cause of any
other instead of a bare timeout. Its texts name brokers as librdkafka does
(``sasl_ssl://host:port/bootstrap``): the bootstrap servers carry no credentials.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError

__all__ = ["ConnectionFailures"]

# Configuration problems: the same attempt fails the same way however often it is retried.
_DEFINITIVE = {
    KafkaError._AUTHENTICATION: "authentication failed",
    KafkaError.SASL_AUTHENTICATION_FAILED: "authentication failed",
    KafkaError._SSL: "TLS handshake failed",
}
# A transport error in the TLS handshake is TLS spoken to a plain listener, or a client
# certificate the broker refused: as definitive as an untrusted broker certificate.
_TLS_WORDS = ("SSL handshake failed", "ssl/tls alert")
# Worth naming when the wait runs out, but possibly passing (a broker restarting).
_TRANSIENT = {KafkaError._TRANSPORT, KafkaError._RESOLVE, KafkaError._ALL_BROKERS_DOWN}
# librdkafka's words when a listener hangs up without a word: what a TLS listener does
# to a client speaking plain Kafka (at its first request), and a SASL listener to one
# that does not authenticate (at its first request after ApiVersions).
_HUNG_UP = "connection closed by peer"
_HUNG_UP_HINT = "is this a TLS or SASL listener (tls=, sasl=)?"


class ConnectionFailures:
    """An ``error_cb`` and a ``logger`` for one client (both called on whatever thread
    polls it): records the latest connection failure, forwards every log line to
    ``logger`` and every error to the user's own ``error_cb``."""

    def __init__(
        self, logger: logging.Logger, error_cb: Callable[[KafkaError], object] | None = None
    ) -> None:
        self._logger = logger
        self._user_error_cb = error_cb
        self._lock = threading.Lock()
        self._definitive: str | None = None
        self._last: str | None = None

    def error_cb(self, error: KafkaError) -> None:
        code = error.code()
        with self._lock:
            if code in _DEFINITIVE:
                self._definitive = f"{_DEFINITIVE[code]}: {error.str()}"
            elif code == KafkaError._TRANSPORT and any(w in error.str() for w in _TLS_WORDS):
                self._definitive = f"TLS handshake failed: {error.str()}"
            elif code in _TRANSIENT and (
                code != KafkaError._ALL_BROKERS_DOWN or self._last is None
            ):
                self._last = f"{error.name()}: {error.str()}"
        if self._user_error_cb is not None:
            self._user_error_cb(error)

    def log(self, level: int, msg: str, *args: Any) -> None:
        """librdkafka's log line (``logger.log(level, fmt, *args)``, as for a Logger)."""
        self._logger.log(level, msg, *args)
        # confluent-kafka logs (facility, client name, line); FAIL: a connection failed.
        if len(args) == 3 and args[0] == "FAIL":
            text = str(args[2])
            if text.startswith("[thrd:"):
                text = text.partition("]: ")[2]
            if _HUNG_UP in text:
                text = f"{text} - {_HUNG_UP_HINT}"
            with self._lock:
                self._last = text

    @property
    def definitive(self) -> str | None:
        """A failure no retry cures (wrong credentials, untrusted certificate), if any."""
        with self._lock:
            return self._definitive

    def reason(self) -> str | None:
        """The best account of why the brokers were not reached, if any was reported."""
        with self._lock:
            return self._definitive or self._last
