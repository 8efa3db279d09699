"""``keybus publish``: send one record (VALUE), or one per line of standard input.

Records go one at a time, each acknowledged before the next is sent: the order of the
lines is the order on the topic, per key. Ctrl-C / SIGTERM stops reading at once (the
input may stay open upstream); the lines already read are still published, then the
command exits 130 (a second signal cancels that too). With ``--envelope`` each value is the JSON
payload of an envelope of ``--aggregate-id`` and ``--type``; the first gets
``--version`` and each next line the version after it (one aggregate's successive
events). Blank lines are skipped.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from keybus.cli import common
from keybus.cli.lines import stdin_lines
from keybus.envelope import Envelope, envelope_headers
from keybus.errors import EnvelopeError

__all__ = ["publish"]


def _headers(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{pair!r} is not name=value", param_hint="--header")
        out[name] = value
    return out


async def _values(value: str | None, stop: asyncio.Event) -> AsyncIterator[tuple[int, str]]:
    """(line number, text): VALUE itself, or standard input's non-blank lines."""
    if value is not None and value != "-":
        yield 1, value
        return
    async for number, text in stdin_lines(stop):
        if text.strip():
            yield number, text


# (a module-level default: a list-typed option's default call would be a mutable one)
_HEADERS = typer.Option(None, "--header", help="A header name=value (repeat for more).")


def publish(
    url: str | None = common.URL,
    topic: str | None = typer.Argument(
        None, metavar="TOPIC", help="The topic to publish to.", show_default=False
    ),
    value: str | None = typer.Argument(
        None,
        metavar="VALUE",
        help="The value; '-' or left out: one record per line of standard input.",
    ),
    key: str | None = typer.Option(None, "--key", help="The record's key (its partition)."),
    header: list[str] | None = _HEADERS,
    envelope: bool = typer.Option(
        False, "--envelope", help="Send envelopes: VALUE / each line is the JSON payload."
    ),
    aggregate_id: str | None = typer.Option(
        None, "--aggregate-id", help="The envelope's aggregate id (its key)."
    ),
    event_type: str | None = typer.Option(None, "--type", help="The envelope's event type."),
    version: int = typer.Option(
        1, "--version", min=1, help="The first envelope's version (next lines: +1 each)."
    ),
    as_json: bool = common.JSON,
    config: Path | None = common.CONFIG,
    connect_timeout: float = common.CONNECT_TIMEOUT,
) -> None:
    """Publish a record, or one per line of standard input, and print what the broker
    acknowledged."""
    where, (name, text) = common.target(url, config, connect_timeout, topic, value)
    topic_name = common.topic_given(name)
    extra = _headers(header or [])
    if envelope:
        if not aggregate_id or not event_type:
            raise typer.BadParameter("--envelope needs --aggregate-id and --type")
        if key is not None:
            raise typer.BadParameter("an envelope's key is its aggregate id: leave --key out")
    elif aggregate_id or event_type:
        raise typer.BadParameter("--aggregate-id and --type go with --envelope")

    async def send(stop: asyncio.Event) -> int:
        await _send(
            where,
            _values(text, stop),
            topic_name,
            key,
            extra,
            envelope,
            aggregate_id,
            event_type,
            version,
            as_json,
        )
        return common.INTERRUPTED if stop.is_set() else 0

    # (one VALUE: a signal cancels its publish, as any one-shot command's)
    common.run(where, send, drains=text is None or text == "-")


def _record(number: int, text: str, aggregate_id: str, event_type: str, version: int) -> Envelope:
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise EnvelopeError("payload", f"line {number} is not JSON: {exc}") from None
    return Envelope(
        aggregate_id=aggregate_id, event_type=event_type, event_version=version, payload=payload
    )


async def _send(
    where: common.Target,
    values: AsyncIterator[tuple[int, str]],
    topic: str,
    key: str | None,
    extra: dict[str, str],
    envelope: bool,
    aggregate_id: str | None,
    event_type: str | None,
    version: int,
    as_json: bool,
) -> None:
    async with common.open_bus(where) as bus:
        await bus.describe_topic(topic)  # publishing would create a missing one (NATS)
        sent = 0
        async for number, text in values:
            data, record_key = text.encode(), key
            headers: dict[str, str | bytes] = dict(extra)
            shown: dict[str, Any] = {"topic": topic, "key": key}
            if envelope:
                assert aggregate_id is not None
                assert event_type is not None
                made = _record(number, text, aggregate_id, event_type, version + sent)
                data, record_key = made.to_bytes(), aggregate_id
                headers = {**envelope_headers(made), **extra}
                shown.update(
                    key=aggregate_id,
                    event_id=made.event_id,
                    event_type=event_type,
                    event_version=made.event_version,
                )
            await bus.publish(topic, data, key=record_key, headers=headers)
            shown["bytes"] = len(data)
            if as_json:
                common.emit_json(shown)
            else:
                details = "  ".join(f"{k}={v}" for k, v in shown.items() if k != "topic")
                line = f"[green]acknowledged[/green] {escape(topic)}  {escape(details)}"
                common.console.print(line)
            sent += 1
