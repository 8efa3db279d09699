"""``keybus run --workers N``: N worker processes of one app, each a member of its
groups — how a service uses more than one core (and, started anywhere with the same
group, more than one machine).

The supervisor restarts a worker that died with backoff, forwards SIGTERM/SIGINT to the
workers (the first closes them gracefully, a second cuts their close short), waits for
them — bounded: past the close timeout and a margin it kills what is left — and leaves
no orphan: each worker is started with ``PR_SET_PDEATHSIG``, so it gets SIGTERM (and
closes gracefully) even if the supervisor itself is killed.

A stop signal that arrives while a worker is being started would find no process in its
slot yet, and the worker would run on until it is killed at the bound. So the stop
signals are blocked while a worker starts (the worker unblocks them in its own process
before it runs): one arriving meanwhile is handled once the worker is in its slot, and
forwarded to it. Once a stop signal came, no worker is started any more.

A worker the forwarded signal reaches before it set up its own handling (it was still
starting) ends by the signal itself: that is the stop asked for, not a failure.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

from keybus.app import EXIT_FAILED, EXIT_FORCED, EXIT_OK

__all__ = ["supervise"]

log = logging.getLogger("keybus.app")

_PR_SET_PDEATHSIG = 1
_TICK = 0.1
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_KILL_MARGIN = 10.0  # past the close timeout, before what is left is killed
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def _prepare_child() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: deliver SIGTERM to this process when its parent dies; and take the stop
    signals the parent blocked while starting it (the mask survives exec)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    start_at: float = 0.0
    codes: list[int] = field(default_factory=list)


def supervise(worker_argv: Sequence[str], workers: int, close_timeout: float) -> int:
    """Run ``workers`` processes of ``worker_argv`` (each told its index in
    ``KEYBUS_WORKER``) until signalled; returns the exit code for the supervisor."""
    slots = [_Slot(i) for i in range(workers)]
    signals: list[int] = []

    def on_signal(number: int, frame: FrameType | None) -> None:
        signals.append(number)
        for slot in slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(number)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not signals:
            now = time.monotonic()
            for slot in slots:
                _tend(slot, worker_argv, now, signals)
            time.sleep(_TICK)
        return _wind_down(slots, close_timeout, signals)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _tend(slot: _Slot, argv: Sequence[str], now: float, signals: list[int]) -> None:
    process = slot.process
    if process is not None:
        code = process.poll()
        if code is None:
            return
        slot.codes.append(code)
        slot.process = None
        delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2**slot.restarts)
        slot.restarts += 1
        slot.start_at = now + delay
        log.warning(
            "keybus: worker %d (pid %d) exited with %d; restarting it in %.1f s",
            slot.index,
            process.pid,
            code,
            delay,
        )
        return
    if now >= slot.start_at:
        _start(slot, argv, signals)


def _start(slot: _Slot, argv: Sequence[str], signals: list[int]) -> None:
    """Start the slot's worker, unless a stop signal came (see the module's docstring)."""
    env = {**os.environ, "KEYBUS_WORKER": str(slot.index)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        if signals:  # (checked with the signals blocked: none can come in between)
            return
        slot.process = subprocess.Popen(list(argv), env=env, preexec_fn=_prepare_child)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    log.info("keybus: worker %d started (pid %d)", slot.index, slot.process.pid)


def _wind_down(slots: list[_Slot], close_timeout: float, signals: list[int]) -> int:
    """Wait for the workers the signal reached; kill what is left past the bound."""
    deadline = time.monotonic() + close_timeout + _KILL_MARGIN
    codes: list[int] = []
    for slot in slots:
        process = slot.process
        if process is None:
            continue
        try:
            code = process.wait(max(0.0, deadline - time.monotonic()))
            # (ended by a forwarded signal it had no handler for yet: stopped as asked)
            codes.append(EXIT_OK if -code in signals else code)
        except subprocess.TimeoutExpired:
            log.error(
                "keybus: worker %d (pid %d) did not stop in time: killed", slot.index, process.pid
            )
            process.kill()
            process.wait()
            codes.append(EXIT_FAILED)
    if any(code == EXIT_FORCED for code in codes):
        return EXIT_FORCED
    if all(code == EXIT_OK for code in codes):
        return EXIT_OK
    return EXIT_FAILED


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command a worker runs: this interpreter, ``-m keybus`` and ``argv``."""
    return [sys.executable, "-m", "keybus", *argv]
