"""Standard input's lines, read off the event loop.

Reading ``sys.stdin`` on the loop holds the loop until the next line comes, so a signal's
handler (Ctrl-C, SIGTERM) would not run until then — with the input left open upstream,
never. A worker thread reads instead (``asyncio.to_thread``), waiting at most ``POLL``
seconds per call: a stop is seen within that, and the thread never outlives the command
(``asyncio.run`` joins the default executor on its way out). ``poll`` rather than the
loop's own reader: it takes a regular file or ``/dev/null`` as well as a pipe or a
terminal, and the descriptor keeps its blocking mode (a terminal is the shell's too).
"""

from __future__ import annotations

import asyncio
import io
import os
import select
import sys
from collections.abc import AsyncIterator

__all__ = ["stdin_lines"]

POLL = 0.1  # s: the longest a stop waits for the reading thread
CHUNK = 4096  # bytes per read: what a stop still publishes is at most this much input


def _read_some(fd: int, timeout: float) -> bytes | None:
    """What ``fd`` has (up to CHUNK bytes; ``b""`` at its end), ``None`` when nothing
    came within ``timeout``."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(timeout * 1000):
        return None
    return os.read(fd, CHUNK)


def _fileno() -> int | None:
    try:
        return sys.stdin.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None  # an in-memory stand-in (a test runner's input): it never blocks


async def stdin_lines(stop: asyncio.Event) -> AsyncIterator[tuple[int, str]]:
    """(line number, text) of standard input's lines, line ends removed, until its end
    or until ``stop`` is set. Every complete line already read is still yielded after a
    stop (what was taken from the input is not lost); a last line without its line end
    counts at the input's end only — at a stop its writer may not have finished it."""
    if sys.stdin is None:  # started with standard input closed: nothing to read
        return
    fd = _fileno()
    if fd is None:
        for number, line in enumerate(sys.stdin, 1):
            yield number, line.rstrip("\r\n")
        return
    encoding, errors = sys.stdin.encoding or "utf-8", sys.stdin.errors or "strict"
    pending, number = b"", 0
    while not stop.is_set():
        chunk = await asyncio.to_thread(_read_some, fd, POLL)
        if chunk is None:
            continue
        if not chunk:
            if pending:
                yield number + 1, pending.decode(encoding, errors).rstrip("\r")
            return
        *complete, pending = (pending + chunk).split(b"\n")
        for raw in complete:
            number += 1
            yield number, raw.decode(encoding, errors).rstrip("\r")
