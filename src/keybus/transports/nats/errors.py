"""nats-py's errors, translated into keybus's at the transport's boundary.

Every place the transport turns a NATS failure (or one of its own) into a
:mod:`keybus.errors` type goes through :func:`translate`, so the same event raises the
same type here as on the other backends::

    connect      ConnectError(url, reason)            no server answers, no JetStream
    publish      PublishError(topic, reason)          refused, not acknowledged in time
    subscribe    SubscribeError(topic, group, reason) stream lookup, group-state bucket
    create, describe, delete
                 TopicError(topic, action, reason)    a JetStream API call failed

and a call on a closed transport raises :func:`closed` (``BusClosedError``; one on a
transport that never connected, or whose connection is gone for good, ``ConnectError``).
A publish that can never succeed as it is — over the server's ``max_payload`` (checked
before sending), refused by JetStream for its size (:data:`PERMANENT_REFUSALS`), or a
duplicate within the de-duplication window — is a ``PublishError`` with
``permanent=True``. A reason carries what the server said
when it said something — a JetStream API error's description, status and error code
(``insufficient resources (status 503, JetStream error 10023)``) — and the library's
exception is chained as ``__cause__``.
"""

from __future__ import annotations

import ssl

import nats.errors
import nats.js.errors

from keybus.dedupe import DUPLICATE_REASON
from keybus.errors import Action, BusClosedError, KeybusError, PublishError, error_for

__all__ = [
    "NATS_ERRORS",
    "OVERLAP",
    "PERMANENT_REFUSALS",
    "Action",
    "Duplicate",
    "Overlap",
    "PlainRefused",
    "Unsent",
    "closed",
    "is_permanent",
    "reason",
    "refused",
    "translate",
]

NATS_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, TimeoutError, OSError)
"""What a failing NATS call can raise: the client's errors (JetStream's derive from
them), timeouts and socket errors."""

PERMANENT_REFUSALS = frozenset({10054, 10097})
"""JetStream error codes that refuse a record for what it is, so that sending it again
cannot succeed: ``message size exceeds maximum allowed`` (the stream's ``max_msg_size``)
and ``header size exceeds maximum allowed of 64k``."""

OVERLAP = 10065
"""JetStream's ``subjects overlap with an existing stream``: a stream of another name
already stores a subject the new stream would."""


class Duplicate(nats.errors.Error):
    """The server acknowledged a publish as a duplicate (PubAck ``"duplicate": true``):
    a record with the same ``Nats-Msg-Id`` was stored within the stream's window, and this
    one was not."""

    def __str__(self) -> str:
        return DUPLICATE_REASON


class Overlap(nats.errors.Error):
    """Creating a topic's stream failed because another stream already stores its
    subject (JetStream error 10065): the server's words, the stream that holds the
    subject (when the server names it) and — for a subject-layout topic (``hint``) — how
    to use that stream. The server's ``APIError`` is ``api_error`` (and the cause)."""

    def __init__(
        self, api_error: nats.js.errors.APIError, subject: str, holder: str | None, *, hint: bool
    ) -> None:
        super().__init__()
        self.api_error = api_error
        self.subject = subject
        self.holder = holder
        self.hint = hint

    def __str__(self) -> str:
        text = reason(self.api_error)
        if self.holder is None:
            return text
        text = f"{text}: stream {self.holder} already stores subject {self.subject}"
        if self.hint:
            text += f" (to use it: SubjectLayout(stream={self.holder!r}, subjects=<its subjects>))"
        return text


class PlainRefused(nats.errors.Error):
    """TLS was asked for (``tls=``, ``tls://``) but the server does not offer it: the
    connect is refused before a password or token is sent."""

    def __str__(self) -> str:
        return "TLS required (tls= or tls://) but the server does not offer TLS"


class Unsent(nats.errors.ConnectionClosedError):
    """A publish refused by a client that is closed, before anything was sent: it may be
    sent again on the client that replaces it."""


def is_permanent(exc: BaseException) -> bool:
    """Whether a publish that failed with ``exc`` can never succeed as it is."""
    if isinstance(exc, Duplicate):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in PERMANENT_REFUSALS


def refused(exc: BaseException) -> bool:
    """Whether a connect attempt failed for a reason trying again cannot change: the
    server refused the credentials, or TLS failed (a certificate not trusted, or not
    given; TLS asked for but not offered)."""
    if isinstance(exc, ssl.SSLError | nats.errors.AuthorizationError | PlainRefused):
        return True
    return isinstance(exc, nats.errors.Error) and _AUTHORIZATION in str(exc).lower()


_AUTHORIZATION = "authorization violation"


def reason(exc: BaseException, timeout: float | None = None) -> str:
    """What went wrong, in words: the server's own when it gave any. ``timeout``: how
    long the call had, for the words of a timeout."""
    if isinstance(exc, nats.js.errors.APIError) and (exc.code or exc.description):
        codes = [f"status {exc.code}"] if exc.code else []
        if exc.err_code:
            codes.append(f"JetStream error {exc.err_code}")
        text = exc.description or type(exc).__name__
        return f"{text} ({', '.join(codes)})" if codes else text
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return "no stream answered"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.strerror or exc}"
    if isinstance(exc, nats.errors.AuthorizationError) or (
        isinstance(exc, nats.errors.Error) and _AUTHORIZATION in str(exc).lower()
    ):
        return "authorization violation (the server refused the credentials)"
    if isinstance(exc, TimeoutError):  # nats.errors.TimeoutError derives from it
        if timeout is None:
            return "the server did not answer in time"
        return f"no answer within {timeout:g} s"
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return "the connection is closed"
    if isinstance(exc, Duplicate):
        return DUPLICATE_REASON
    return str(exc) or type(exc).__name__


def translate(
    cause: BaseException | str,
    action: Action,
    subject: str,
    *,
    group: str = "",
    context: str = "",
    timeout: float | None = None,
) -> KeybusError:
    """The keybus error for ``action`` on ``subject`` (the URL for ``connect``, else the
    topic; ``group`` for ``subscribe``) failing because of ``cause``: a NATS exception or
    the transport's own words. ``context`` prefixes the reason (what was being done);
    ``timeout`` is how long the call had. The caller raises what this returns."""
    if isinstance(cause, str):
        text = cause
    elif action == "publish" and timeout is not None and isinstance(cause, TimeoutError):
        text = f"no acknowledgement within {timeout:g} s"
    else:
        text = reason(cause, timeout)
    if context:
        text = f"{context}: {text}"
    error: KeybusError
    if action == "publish" and isinstance(cause, BaseException) and is_permanent(cause):
        error = PublishError(subject, text, permanent=True)
    else:
        error = error_for(action, subject, text, group=group)
    if isinstance(cause, BaseException):
        error.__cause__ = cause
    return error


def closed(url: str) -> BusClosedError:
    """What a call on a closed transport raises (publish, consumer(), admin)."""
    return BusClosedError(f"the NATS transport {url} is closed")
