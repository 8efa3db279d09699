"""``keybus dlq``: the parked keys of a topic (``on_dead_letter="park"``) — list them,
and have one replayed or discarded.

A replay hands the parked messages to the subscription's handler, on the member that
owns the key's partition: that is the running service, not this process. So ``replay``
and ``discard`` write a request into the parked-keys store; the owning member performs
it (``bus.replay_parked`` / ``discard_parked``, with their ordering guarantees) and
writes the outcome back; the command waits for it, ``--timeout`` seconds at most
(``bus.request_parked``).

Exit codes, on top of the common ones (0 done, 1 a keybus error such as an unreachable
broker, 2 a usage error, 130 interrupted):

- ``list``: 0 listed (parked keys or none); 3 some keys are parked and
  ``--fail-if-parked`` was given (for a monitoring job).
- ``replay`` / ``discard``: 0 done, the key flows again (or it was not parked); 3 the key
  is still parked (the replay failed again, or the owner refused: a replay of it was
  running); 4 no member answered in time (is the service running?).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from keybus.cli import common
from keybus.parked_requests import ParkedRequest
from keybus.parking import ParkedKey

__all__ = ["PARKED", "TIMED_OUT", "dlq"]

PARKED = 3  # keys parked (list --fail-if-parked), or the key still parked (replay, discard)
TIMED_OUT = 4  # no member of the group answered a replay / discard in time

dlq = typer.Typer(
    add_completion=False, help="Parked keys (subscriptions with on_dead_letter=park)."
)

_TOPIC = typer.Argument(None, metavar="TOPIC", help="The subscribed topic.", show_default=False)
_GROUP = typer.Option(..., "--group", help="The subscription's group.")
_DEAD_LETTER_TOPIC = typer.Option(
    "", "--dead-letter-topic", help="The subscription's dead-letter topic (default: TOPIC.dlq)."
)
_KEY = typer.Option(..., "--key", help="The parked key.")
_TIMEOUT = typer.Option(
    60.0, "--timeout", min=0.1, help="Seconds to wait for the owning member's answer."
)


@dlq.command("list")
def list_parked(
    url: str | None = common.URL,
    topic: str | None = _TOPIC,
    group: str = _GROUP,
    dead_letter_topic: str = _DEAD_LETTER_TOPIC,
    fail_if_parked: bool = typer.Option(
        False, "--fail-if-parked", help=f"Exit {PARKED} when some keys are parked."
    ),
    as_json: bool = common.JSON,
    config: Path | None = common.CONFIG,
    connect_timeout: float = common.CONNECT_TIMEOUT,
) -> None:
    """List the parked keys of TOPIC in GROUP: count, first failure, age, reason."""
    where, (name,) = common.target(url, config, connect_timeout, topic)
    subscribed = common.topic_given(name)

    async def show(stop: asyncio.Event) -> int:
        async with common.open_bus(where) as bus:
            rows = await bus.parked(subscribed, group, dead_letter_topic=dead_letter_topic or None)
        _print(sorted(rows, key=lambda r: r.since), subscribed, group, as_json)
        return PARKED if rows and fail_if_parked else 0

    common.run(where, show)


def _print(rows: list[ParkedKey], topic: str, group: str, as_json: bool) -> None:
    if as_json:
        for row in rows:
            common.emit_json(
                {
                    "key": row.key,
                    "count": row.count,
                    "first_failure": row.first_failure,
                    "event_id": row.event_id,
                    "age": round(row.age, 3),
                    "reason": row.reason,
                }
            )
        return
    if not rows:
        common.console.print(f"no parked keys in {escape(topic)} ({escape(group)})")
        return
    table = Table(title=f"parked keys of {topic} ({group})")
    for column in ("key", "parked", "first failure", "event id", "age (s)", "reason"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.key,
            str(row.count),
            row.first_failure,
            row.event_id or "",
            f"{row.age:.0f}",
            row.reason,
        )
    common.console.print(table)


def _request_command(action: str, summary: str) -> None:
    """Register ``keybus dlq ACTION``: a request through the store, its answer reported."""

    def command(
        url: str | None = common.URL,
        topic: str | None = _TOPIC,
        key: str = _KEY,
        group: str = _GROUP,
        dead_letter_topic: str = _DEAD_LETTER_TOPIC,
        timeout: float = _TIMEOUT,
        config: Path | None = common.CONFIG,
        connect_timeout: float = common.CONNECT_TIMEOUT,
    ) -> None:
        where, (name,) = common.target(url, config, connect_timeout, topic)
        subscribed = common.topic_given(name)

        async def ask(stop: asyncio.Event) -> int:
            async with common.open_bus(where) as bus:
                answer = await bus.request_parked(
                    subscribed,
                    key=key,
                    action=action,
                    group=group,
                    dead_letter_topic=dead_letter_topic or None,
                    timeout=timeout,
                )
            return _report(answer, subscribed, group)

        common.run(where, ask)

    command.__doc__ = summary
    dlq.command(action)(command)


_request_command(
    "replay",
    """Have the service replay KEY's parked messages, in order, then unpark KEY.

    The member of GROUP owning KEY's partition hands them to its (fixed) handler, then
    KEY's live messages flow again; this waits for its answer.""",
)
_request_command(
    "discard",
    """Have the service drop KEY's parked messages, then unpark KEY.

    The drop is recorded in the dead-letter topic; KEY's live messages flow again.""",
)


def _report(answer: ParkedRequest, topic: str, group: str) -> int:
    key = escape(answer.key)
    where = f"{escape(topic)} ({escape(group)})"
    if answer.outcome == "replayed":
        common.console.print(f"replayed {answer.handled} parked message(s) of {key}: it flows")
    elif answer.outcome == "discarded":
        common.console.print(f"discarded {answer.handled} parked message(s) of {key}: it flows")
    elif answer.outcome == "not-parked":
        common.console.print(f"{key} is not parked in {where}")
    else:
        plain = answer.key  # common.fail escapes what it prints
        text = {
            "failed": f"the replay failed again after {answer.handled} message(s); {plain} "
            f"is still parked: {answer.reason}",
            "refused": f"{plain} is still parked: {answer.reason}",
            "timed-out": f"{plain} is still parked: {answer.reason} (is the service running?)",
        }[answer.outcome]
        common.fail(None, text)
        return TIMED_OUT if answer.outcome == "timed-out" else PARKED
    return 0
