"""``keybus run --workers``' supervisor, with a stop signal that arrives while it starts
a worker — the moment a signal handler cannot see the new process yet::

    python -m tests.supervisor_proc LOG WORKERS CLOSE_TIMEOUT

Each worker writes ``ready <pid>`` to LOG once its SIGTERM handler is in place (then
exits 0 on SIGTERM), and ``gone <pid>`` when it ends by it. The supervisor sends itself
SIGTERM from inside the first worker's start, after the process was made.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from keybus.cli import supervisor

WORKER = """
import os, signal, sys, time
log = sys.argv[1]
def stop(*_):
    with open(log, "a") as f:
        f.write(f"gone {os.getpid()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
with open(log, "a") as f:
    f.write(f"ready {os.getpid()}\\n")
time.sleep(120)  # (the test kills what is left)
"""

_real_popen = subprocess.Popen


class _SignalledWhileStarting(_real_popen):  # type: ignore[type-arg]
    starts = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _SignalledWhileStarting.starts += 1
        if _SignalledWhileStarting.starts == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    log, workers, close_timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    subprocess.Popen = _SignalledWhileStarting  # type: ignore[misc]
    argv = [sys.executable, "-c", WORKER, log]
    return supervisor.supervise(argv, workers, close_timeout)


if __name__ == "__main__":
    sys.exit(main())
