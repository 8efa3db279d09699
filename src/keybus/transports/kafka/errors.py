"""confluent-kafka's errors, translated into keybus's at the transport's boundary.

Every place the transport turns a librdkafka failure (or one of its own, such as a wait
that ran out) into a :mod:`keybus.errors` type goes through :func:`translate`, so the
same event raises the same type here as on the other backends::

    connect      ConnectError(url, reason)            the probe or the admin client failed
    publish      PublishError(topic, reason)          refused, not acknowledged, purged
    subscribe    SubscribeError(topic, group, reason) no consumer, no assignment in time,
                                                      the group refused the member's join
                                                      (INCONSISTENT_GROUP_PROTOCOL)
    create, describe, delete
                 TopicError(topic, action, reason)    an admin request failed or timed out

and a call on a closed transport raises :func:`closed` (``BusClosedError``). A reason
keeps librdkafka's error name and text (``MSG_SIZE_TOO_LARGE: ...``); the library's
exception is chained as ``__cause__``. Where keybus knows the remedy it follows the
reason (:func:`protocol_conflict`).
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, KafkaException

from keybus.errors import Action, BusClosedError, KeybusError, error_for

__all__ = [
    "Action",
    "closed",
    "error_code",
    "is_fatal",
    "protocol_conflict",
    "reason",
    "translate",
]


def reason(err: Any) -> str:
    """librdkafka's error name and text, or a Python exception's text."""
    if isinstance(err, KafkaException) and err.args and isinstance(err.args[0], KafkaError):
        err = err.args[0]
    if isinstance(err, KafkaError):
        return f"{err.name()}: {err.str()}"
    return str(err) or type(err).__name__


def error_code(exc: BaseException) -> int | None:
    """The librdkafka error code of a ``KafkaException``, else None."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        code: int = exc.args[0].code()
        return code
    return None


def is_fatal(exc: BaseException) -> bool:
    """librdkafka raised a fatal error: the handle is unusable from now on."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return bool(exc.args[0].fatal())
    return False


def protocol_conflict(eager: bool) -> str:
    """What an ``INCONSISTENT_GROUP_PROTOCOL`` refusal of our JoinGroup means, and the
    remedy. The coordinator refuses a joining member none of whose assignors the group's
    current members support: a cooperative keybus member (our default,
    ``cooperative-sticky``) joining the Go services' sarama consumers (eager ``range``),
    or a keybus member configured eager joining a cooperative group. ``eager``: this
    member's assignor is eager (``KafkaSettings.eager``)."""
    if eager:
        return (
            "the group's other members use a different partition assignment protocol "
            "(e.g. keybus's default cooperative-sticky) than this consumer's eager "
            "partition.assignment.strategy; use the strategy of the group's members "
            "in consumer_config, or give this service its own group"
        )
    return (
        "the group's other members use a different partition assignment protocol "
        "(e.g. sarama's eager range, the Go services' default) than this consumer's "
        "cooperative-sticky; give this service its own group, or set "
        "consumer_config={'partition.assignment.strategy': 'range'} to join them"
    )


def translate(
    cause: BaseException | KafkaError | str,
    action: Action,
    subject: str,
    *,
    group: str = "",
    context: str = "",
    hint: str = "",
) -> KeybusError:
    """The keybus error for ``action`` on ``subject`` (the URL for ``connect``, else the
    topic; ``group`` for ``subscribe``) failing because of ``cause``: a confluent-kafka
    exception, a ``KafkaError`` from a delivery report or a consumer's error event, any
    other exception (a bad setting), or the transport's own words. ``context`` prefixes
    the reason (what was being done), ``hint`` follows it (what to do about it). The
    caller raises (or sets) what this returns."""
    text = reason(cause) if not isinstance(cause, str) else cause
    if context:
        text = f"{context}: {text}"
    if hint:
        text = f"{text} - {hint}"
    error = error_for(action, subject, text, group=group)
    if isinstance(cause, KafkaError):  # a delivery report's error is no exception
        error.__cause__ = KafkaException(cause)
    elif isinstance(cause, BaseException):
        error.__cause__ = cause
    return error


def closed(url: str) -> BusClosedError:
    """What a call on a closed transport raises (publish, consumer(), admin)."""
    return BusClosedError(f"the Kafka transport {url} is closed")
