"""``keybus health``: ``bus.health()`` of a fresh bus, for a probe or a person. Exit 0
when every check is ok, 1 when not — a broker that cannot be reached at all is a
``broker`` check that failed, within ``--connect-timeout``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from keybus.cli import common
from keybus.errors import ConnectError
from keybus.health import Check, Health

__all__ = ["health"]


def health(
    url: str | None = common.URL,
    timeout: float = typer.Option(2.0, "--timeout", min=0.1, help="Seconds for the checks."),
    as_json: bool = common.JSON,
    config: Path | None = common.CONFIG,
    connect_timeout: float = common.CONNECT_TIMEOUT,
) -> None:
    """Whether the broker answers (and how fast): a table, or JSON; exit 0 if healthy,
    1 if not."""
    where, _ = common.target(url, config, connect_timeout)

    async def check(stop: asyncio.Event) -> int:
        report = await _health(where, timeout)
        _print(report, where, as_json)
        return 0 if report.ok else 1

    common.run(where, check)


async def _health(where: common.Target, timeout: float) -> Health:
    try:
        async with common.open_bus(where) as bus:
            return await bus.health(timeout)
    except ConnectError as exc:
        backend = (where.url or "").split("://", 1)[0] or "?"
        return Health(backend, {"broker": Check("broker", False, where.redact(str(exc)))})


def _print(report: Health, where: common.Target, as_json: bool) -> None:
    if as_json:
        checks: dict[str, Any] = {
            name: {"ok": c.ok, "detail": c.detail, "values": dict(c.values)}
            for name, c in report.checks.items()
        }
        common.emit_json({"ok": report.ok, "backend": report.backend, "checks": checks})
        return
    verdict = "[green]healthy[/green]" if report.ok else "[red]NOT healthy[/red]"
    table = Table(title=f"{escape(where.shown)}: {verdict}")
    table.add_column("check")
    table.add_column("ok")
    table.add_column("detail")
    for name, c in report.checks.items():
        mark = "[green]yes[/green]" if c.ok else "[red]no[/red]"
        table.add_row(escape(name), mark, escape(c.detail))
    common.console.print(table)
