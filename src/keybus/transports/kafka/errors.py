"""confluent-kafka's errors, translated into keybus's at the transport's boundary.

Every place the transport turns a librdkafka failure (or one of its own, such as a wait
that ran out) into a :mod:`keybus.errors` type goes through :func:`translate`, so the
same event raises the same type here as on the other backends::

    connect      ConnectError(url, reason)            the probe or the admin client failed
    publish      PublishError(topic, reason)          refused, not acknowledged, purged
                 (permanent=True for a refusal of the record itself: PERMANENT_REFUSALS)
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

from keybus.errors import Action, BusClosedError, KeybusError, PublishError, error_for

__all__ = [
    "PERMANENT_REFUSALS",
    "Action",
    "closed",
    "error_code",
    "is_fatal",
    "is_permanent",
    "protocol_conflict",
    "reason",
    "translate",
]


PERMANENT_REFUSALS = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD}
)
"""librdkafka error codes that refuse a record for what it is, so that sending it again
cannot succeed, while a smaller or different record could: the record is larger than the
producer's ``message.max.bytes`` (librdkafka raises this code itself, from ``produce()``;
it has no separate local code) or than the broker's or topic's limit (a delivery report,
at once: librdkafka does not retry it); its batch is larger than the topic's segment; the
broker's validation refused it (e.g. no key on a compacted topic). Not here: errors an
operator or time can cure while the same record waits — ``TOPIC_AUTHORIZATION_FAILED``
(an ACL granted later), ``INVALID_TIMESTAMP`` (a clock put right), ``_MSG_TIMED_OUT``,
``UNKNOWN_TOPIC_OR_PART`` — for which the dead-letter path keeps retrying the record as it
is instead of writing it reduced (a reduced form would be refused alike and lose the
value)."""


def _kafka_error(err: Any) -> KafkaError | None:
    """The ``KafkaError`` of a ``KafkaException`` (or the error itself), else None."""
    if isinstance(err, KafkaException) and err.args and isinstance(err.args[0], KafkaError):
        err = err.args[0]
    return err if isinstance(err, KafkaError) else None


def reason(err: Any) -> str:
    """librdkafka's error name and text, or a Python exception's text."""
    kafka = _kafka_error(err)
    if kafka is not None:
        return f"{kafka.name()}: {kafka.str()}"
    return str(err) or type(err).__name__


def error_code(exc: BaseException) -> int | None:
    """The librdkafka error code of a ``KafkaException``, else None."""
    kafka = _kafka_error(exc)
    return None if kafka is None else int(kafka.code())


def is_permanent(err: BaseException | KafkaError) -> bool:
    """A publish that failed with ``err`` (an exception or a delivery report's error) can
    never succeed as it is: :data:`PERMANENT_REFUSALS`."""
    kafka = _kafka_error(err)
    return kafka is not None and kafka.code() in PERMANENT_REFUSALS


def is_fatal(exc: BaseException) -> bool:
    """librdkafka raised a fatal error: the handle is unusable from now on."""
    kafka = _kafka_error(exc)
    return kafka is not None and bool(kafka.fatal())


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
    error: KeybusError
    if action == "publish" and not isinstance(cause, str) and is_permanent(cause):
        error = PublishError(subject, text, permanent=True)
    else:
        error = error_for(action, subject, text, group=group)
    if isinstance(cause, KafkaError):  # a delivery report's error is no exception
        error.__cause__ = KafkaException(cause)
    elif isinstance(cause, BaseException):
        error.__cause__ = cause
    return error


def closed(url: str) -> BusClosedError:
    """What a call on a closed transport raises (publish, consumer(), admin)."""
    return BusClosedError(f"the Kafka transport {url} is closed")
