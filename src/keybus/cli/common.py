"""What every command that talks to a broker shares: where to connect (a URL or
``--config FILE``), running its coroutine with Ctrl-C / SIGTERM handled, and turning a
keybus error into one line a person reads (credentials redacted) and an exit code.

Exit codes: 0 done, 1 failed (a keybus error: unreachable broker, missing topic...) or
not healthy, 2 a usage error, 130 interrupted before a one-shot command finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape

import keybus
from keybus.bus import EventBus
from keybus.errors import KeybusError
from keybus.security import redact_url, split_credentials

__all__ = [
    "CONFIG",
    "CONNECT_TIMEOUT",
    "JSON",
    "URL",
    "Target",
    "console",
    "detach_stdout",
    "emit_json",
    "open_bus",
    "run",
    "target",
    "topic_given",
]

console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)

INTERRUPTED = 130
_MASK = "**********"

URL = typer.Argument(
    None,
    metavar="URL",
    help="memory://, kafka://host:port[,host:port] or nats://host:port (left out with --config).",
    show_default=False,
)
CONFIG = typer.Option(
    None,
    "--config",
    help="Connect as this configuration file (TOML, YAML, JSON; KEYBUS_* variables "
    "override it) says, instead of URL.",
    show_default=False,
)
CONNECT_TIMEOUT = typer.Option(
    5.0, "--connect-timeout", min=0.1, help="Seconds to reach the broker before giving up."
)
JSON = typer.Option(False, "--json", help="Print JSON (one object per line) instead of tables.")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a command connects: a URL, or a configuration file."""

    url: str | None
    config: Path | None
    connect_timeout: float

    @property
    def shown(self) -> str:
        """For people: the URL with any credentials masked, or the file."""
        return redact_url(self.url) if self.url else f"the configuration in {self.config}"

    def redact(self, text: str) -> str:
        """``text`` (an error's message, say) with this target's URL redacted — and its
        credentials wherever else they show (a client library may quote the host part
        of the URL with them)."""
        if not self.url:
            return text
        text = text.replace(self.url, redact_url(self.url))
        userinfo = urlsplit(self.url).netloc.rpartition("@")[0]
        _, _, password = split_credentials(self.url)
        for secret in (userinfo, password.reveal() if password else ""):
            if secret:
                text = text.replace(secret, _MASK)
        return text


def target(
    url: str | None, config: Path | None, connect_timeout: float, *rest: str | None
) -> tuple[Target, list[str | None]]:
    """The target and the positional arguments after URL. With ``--config`` the URL is
    left out, so what click took for it is the first of the others: shift them."""
    values = list(rest)
    if config is None:
        if url is None:
            raise typer.BadParameter("give a URL, or --config FILE", param_hint="URL")
    elif url is not None:
        if "://" in url:
            raise typer.BadParameter("give a URL or --config, not both", param_hint="URL")
        if values and values[-1] is not None:
            raise typer.BadParameter(f"unexpected extra argument {values[-1]!r}")
        values = [url, *values[:-1]]
        url = None
    return Target(url, config, connect_timeout), values


def topic_given(name: str | None) -> str:
    """The TOPIC argument, which click leaves optional (it shifts with ``--config``)."""
    if name is None:
        raise typer.BadParameter("which topic?", param_hint="TOPIC")
    return name


@contextlib.asynccontextmanager
async def open_bus(where: Target, group: str | None = None) -> AsyncIterator[EventBus]:
    """A bus that never creates a topic by itself (looking must not change anything) in
    ``group`` (``None``: a private one, which the backend drops when the bus closes)."""
    options: dict[str, Any] = {"connect_timeout": where.connect_timeout, "create_topics": False}
    if where.config is not None:
        connector = keybus.connect_from_config(where.config, group=group, **options)
    else:
        assert where.url is not None
        connector = keybus.connect(where.url, group=group, **options)
    async with connector as bus:
        yield bus


def emit_json(data: Any) -> None:
    """One JSON object on a line of its own, flushed: a reader of a pipe sees it now."""
    sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def detach_stdout() -> None:
    """Standard output's reader went away: point it at /dev/null, so that what is still
    written (and the flush at exit) does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def fail(where: Target | None, text: str) -> None:
    shown = where.redact(text) if where is not None else text
    errors.print(f"[red]keybus: {escape(shown)}[/red]")


def run(
    where: Target | None,
    command: Callable[[asyncio.Event], Awaitable[int]],
    *,
    follows: bool = False,
    drains: bool = False,
) -> None:
    """Run ``command(stop)`` and exit with the code it returns. ``stop`` is set on
    SIGINT / SIGTERM: a command that ``follows`` (tail, a watch) ends then by itself,
    closing its bus, and exits 0; one that ``drains`` (publish from standard input)
    ends by itself too, after finishing what it took in, with the code it returns; any
    other is cancelled (its bus closed on the way out) and exits 130. A second signal
    cancels a following or draining command as well (exit 0 and 130)."""
    with quiet_library_logs():
        code = asyncio.run(_guarded(where, command, follows, drains))
    raise typer.Exit(code)


@contextlib.contextmanager
def quiet_library_logs() -> Iterator[None]:
    """A command reports what failed itself, in one line with the URL redacted; the
    library's log lines (librdkafka's connection failures, say, which quote brokers as
    configured) would repeat it, unredacted. Restored after: a command run in-process
    (typer's test runner) leaves the logging set-up as it was."""
    library = logging.getLogger("keybus")
    quiet = logging.NullHandler()
    propagate = library.propagate
    library.addHandler(quiet)
    library.propagate = False
    try:
        yield
    finally:
        library.removeHandler(quiet)
        library.propagate = propagate


async def _guarded(
    where: Target | None,
    command: Callable[[asyncio.Event], Awaitable[int]],
    follows: bool,
    drains: bool,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    work = asyncio.ensure_future(command(stop))
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1 or not (follows or drains):
            work.cancel()

    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, on_signal)
    try:
        return await work
    except asyncio.CancelledError:
        if signals:
            return 0 if follows else INTERRUPTED
        raise
    except KeybusError as exc:
        fail(where, str(exc))
        return 1
    except (TypeError, ValueError) as exc:  # an argument the library refused (a topic name)
        fail(where, str(exc))
        return 2
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)
