"""``keybus run module:app``: run a :class:`keybus.App` until SIGTERM/SIGINT, in this
process or in ``--workers N`` processes under a supervisor."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from keybus.app import EXIT_FAILED, App
from keybus.cli.supervisor import supervise, worker_command
from keybus.errors import KeybusError

__all__ = ["load_app", "run"]

_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [pid %(process)d] %(message)s"


def load_app(target: str) -> App:
    """``module:attribute`` (default attribute ``app``): an App, or a callable making one."""
    module_name, _, attribute = target.partition(":")
    if not module_name:
        raise typer.BadParameter(f"{target!r}: expected module:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the service's own modules
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise typer.BadParameter(f"cannot import {module_name!r}: {exc}") from None
    found = getattr(module, attribute or "app", None)
    if found is not None and not isinstance(found, App) and callable(found):
        found = found()
    if not isinstance(found, App):
        raise typer.BadParameter(f"{target!r} is not a keybus.App (nor makes one)")
    return found


def run(
    target: Annotated[str, typer.Argument(help="The app: module:attribute (default: app).")],
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (members).")] = 1,
    config: Annotated[
        Path | None, typer.Option(help="A configuration file for the connection.")
    ] = None,
    close_timeout: Annotated[
        float | None,
        typer.Option(min=0, help="Seconds handlers get to finish on SIGTERM (default: the app's)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run an app: connect, subscribe its handlers, run until SIGTERM/SIGINT, then close
    gracefully (a second signal cancels running handlers). Exit code: 0 graceful, 1 it
    could not start, 3 a second signal cut the close short."""
    logging.basicConfig(level=log_level.upper(), format=_LOG_FORMAT)
    app = load_app(target)  # also in the supervisor: a bad target fails before any fork
    if close_timeout is not None:
        app.close_timeout = close_timeout
    if workers > 1:
        argv = ["run", target, "--log-level", log_level, "--close-timeout", str(app.close_timeout)]
        if config is not None:
            argv += ["--config", str(config)]
        raise typer.Exit(supervise(worker_command(argv), workers, app.close_timeout))
    if config is not None:
        app.use_config(config)
    try:
        code = asyncio.run(app.run())
    except (KeybusError, OSError, ValueError) as exc:
        logging.getLogger("keybus.app").error("keybus: the app could not start: %s", exc)
        code = EXIT_FAILED
    raise typer.Exit(code)
