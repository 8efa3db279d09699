"""How a delivered record is shown: as a block for people (rich), or as one JSON object.

Bytes that are not UTF-8 are shown as base64 (``value_base64``), never mangled; an
envelope that does not decode is shown as the record it is, with the reason.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

from rich.console import Console
from rich.json import JSON
from rich.markup import escape

from keybus.envelope import Envelope
from keybus.errors import EnvelopeError
from keybus.message import Message

__all__ = ["print_record", "record_json"]


def _text(value: bytes) -> str | None:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


def _stamp(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds")


def _envelope(value: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The envelope's fields as decoded JSON, or why the value is not an envelope."""
    try:
        Envelope.from_bytes(value)  # the rules: what a subscriber would refuse, say so
    except EnvelopeError as exc:
        return None, str(exc)
    fields: dict[str, Any] = json.loads(value)
    return fields, None


def record_json(message: Message, envelope: bool) -> dict[str, Any]:
    """The record as one JSON-ready object."""
    headers = {
        name: _text(raw) or base64.b64encode(raw).decode() for name, raw in message.headers.items()
    }
    out: dict[str, Any] = {
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "key": message.key,
        "timestamp": _stamp(message.timestamp),
        "headers": headers,
    }
    text = _text(message.value)
    if text is None:
        out["value_base64"] = base64.b64encode(message.value).decode()
    else:
        out["value"] = text
    if envelope:
        fields, error = _envelope(message.value)
        out["envelope"] = fields
        if error is not None:
            out["envelope_error"] = error
    return out


def print_record(console: Console, message: Message, envelope: bool) -> None:
    """The record as a block: where it is, key and time, headers, then the envelope's
    fields and its payload (or the value) pretty-printed."""
    stamp = _stamp(message.timestamp) or "-"
    console.print(
        f"[bold cyan]{escape(message.topic)}[/bold cyan] [{message.partition}] "
        f"@{message.offset}  key=[bold]{escape(str(message.key))}[/bold]  {stamp}"
    )
    for name, raw in message.headers.items():
        shown = _text(raw)
        shown = shown if shown is not None else f"(base64) {base64.b64encode(raw).decode()}"
        console.print(f"  [dim]{escape(name)}:[/dim] {escape(shown)}")
    body = message.value
    if envelope:
        fields, error = _envelope(body)
        if fields is None:
            console.print(f"  [red]not an envelope: {escape(error or '')}[/red]")
        else:
            payload = fields.pop("payload", None)
            for name, value in fields.items():
                console.print(f"  [green]{escape(name)}[/green] = {escape(str(value))}")
            console.print(JSON.from_data(payload, indent=2))
            return
    text = _text(body)
    if text is None:
        console.print(f"  (base64) {base64.b64encode(body).decode()}")
        return
    try:
        console.print(JSON(text, indent=2))
    except ValueError:  # not JSON: the text as it is
        console.print(f"  {escape(text)}")
