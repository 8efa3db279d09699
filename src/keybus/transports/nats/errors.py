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
transport that never connected, ``ConnectError``). A reason carries what the server said
when it said something — a JetStream API error's description, status and error code
(``insufficient resources (status 503, JetStream error 10023)``) — and the library's
exception is chained as ``__cause__``.
"""

from __future__ import annotations

import nats.errors
import nats.js.errors

from keybus.errors import Action, BusClosedError, KeybusError, error_for

__all__ = ["NATS_ERRORS", "Action", "closed", "reason", "translate"]

NATS_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, TimeoutError, OSError)
"""What a failing NATS call can raise: the client's errors (JetStream's derive from
them), timeouts and socket errors."""


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
    if isinstance(exc, TimeoutError):  # nats.errors.TimeoutError derives from it
        if timeout is None:
            return "the server did not answer in time"
        return f"no answer within {timeout:g} s"
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return "the connection is closed"
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
    error = error_for(action, subject, text, group=group)
    if isinstance(cause, BaseException):
        error.__cause__ = cause
    return error


def closed(url: str) -> BusClosedError:
    """What a call on a closed transport raises (publish, consumer(), admin)."""
    return BusClosedError(f"the NATS transport {url} is closed")
