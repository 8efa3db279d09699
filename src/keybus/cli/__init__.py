"""The ``keybus`` command line (the ``cli`` extra: ``pip install 'keybus[cli]'``).

The library itself needs neither rich nor typer; only this entry point does, so it says
how to get them instead of failing with a traceback.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    try:
        from keybus.cli.app import main as run
    except ImportError as exc:
        missing = exc.name or str(exc)
        sys.stderr.write(
            f"keybus: the command line needs the 'cli' extra ({missing} is missing): "
            "pip install 'keybus[cli]'\n"
        )
        sys.exit(2)
    run()
