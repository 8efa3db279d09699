"""The moving parts of the fault-injection test: member processes
(``tests/faults/member.py``) and their logs, the producer that records what was
acknowledged, the broker restart, and the seeded controller that kills and freezes
members."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import keybus
from keybus.transports.kafka.config import CONSUMER_DEFAULTS
from keybus.transports.nats.options import NatsOptions
from tests.faults.history import Envelope, History, Pause, parse_member_log
from tests.helpers import envelope

ROOT = Path(__file__).resolve().parents[2]

# How long a member may be silent before others take its partitions: Kafka's session
# timeout, NATS's lease. A pause must outlast it for the member to lose its partitions.
OWNERSHIP_TIMEOUT = {
    "kafka": CONSUMER_DEFAULTS["session.timeout.ms"] / 1000,
    "nats": NatsOptions().lease_ttl,
}


class MemberLog:
    """A member's log file, read as it grows: the lines so far, and which envelopes it
    handled to an ok end (for the drain's poll, without re-reading the whole file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._offset = 0
        self._partial = b""
        self._started: dict[int, Envelope] = {}

    def poll(self, handled: set[Envelope]) -> None:
        """Read what was appended since the last poll; add what it handled to ``handled``."""
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
            self._offset += len(chunk)
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            for raw in complete:
                line = raw.decode()
                self.lines.append(line)
                record = json.loads(line)
                if record["ev"] == "start":
                    self._started[record["seq"]] = (record["aggregate"], record["version"])
                elif record["ev"] == "end" and record["outcome"] == "ok":
                    handled.add(self._started[record["seq"]])

    def history(self) -> History:
        return parse_member_log(self.lines)


class Member:
    """One member process (one incarnation: a replacement is another ``Member``)."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: MemberLog) -> None:
        self.name = name
        self.process = process
        self.log = log
        self.killed_at: float | None = None
        self.frozen = False
        self.pauses: list[Pause] = []
        self._frozen_at = 0.0

    @classmethod
    async def start(
        cls, url: str, topic: str, group: str, name: str, directory: Path, seed: int
    ) -> Member:
        path = directory / f"{name}.jsonl"
        with (directory / f"{name}.stderr").open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.faults.member",
                url,
                topic,
                group,
                name,
                str(path),
                str(seed),
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        return cls(name, process, MemberLog(path))

    async def ready(self, timeout: float = 60.0) -> None:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        assert line.strip() == b"ready", f"member {self.name} said {line!r}"

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def freeze(self) -> None:
        """SIGSTOP: the whole process stops, as in a long GC or VM pause."""
        self._frozen_at = time.monotonic()
        self.process.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        self.frozen = False
        self.pauses.append(Pause(self.name, self._frozen_at, time.monotonic()))

    async def kill(self) -> None:
        if self.alive:
            self.killed_at = time.monotonic()
            self.process.send_signal(signal.SIGKILL)
        await self._reap(30.0)

    async def terminate(self, timeout: float = 30.0) -> bool:
        """SIGTERM (the bus closes, the member leaves); whether it exited with 0 in time
        (else it is killed)."""
        if self.frozen:
            self.thaw()
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        try:
            await self._reap(timeout)
        except TimeoutError:
            await self.kill()
            return False
        return self.process.returncode == 0

    async def _reap(self, timeout: float) -> None:
        assert self.process.stdout is not None
        await asyncio.wait_for(self.process.stdout.read(), timeout)
        await asyncio.wait_for(self.process.wait(), timeout)


@dataclass
class Produced:
    acknowledged: set[Envelope] = field(default_factory=set)
    failures: int = 0  # PublishErrors, each retried


async def produce(
    bus: keybus.EventBus,
    topic: str,
    aggregates: list[str],
    versions: int,
    spread: float,
    produced: Produced,
) -> None:
    """Versions 1..``versions`` of every aggregate, in order per aggregate (each publish
    awaited, a failed one retried until acknowledged), spread evenly over ``spread``
    seconds: the aggregates take turns, so members always have work in hand when a
    fault strikes."""
    begun = time.monotonic()
    step = spread / versions

    async def publish(aggregate: str, version: int) -> None:
        retry_until = time.monotonic() + 120
        while True:
            try:
                await bus.publish_envelope(topic, envelope(aggregate, version))
            except keybus.PublishError:
                produced.failures += 1
                assert time.monotonic() < retry_until, f"{aggregate} v{version} never acked"
                await asyncio.sleep(0.1)
            else:
                produced.acknowledged.add((aggregate, version))
                return

    async def one(index: int, aggregate: str) -> None:
        phase = step * index / len(aggregates)
        for version in range(1, versions + 1):
            # Pacing, not synchronisation: the load lasts as long as the faults do.
            ahead = begun + phase + step * (version - 1) - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
            await publish(aggregate, version)

    await asyncio.gather(*(one(i, aggregate) for i, aggregate in enumerate(aggregates)))


async def broker(backend: str, url: str, *commands: str) -> None:
    """Run the repository's script for the broker (``tools/<backend>/<backend>.sh``) with
    each of ``commands`` in turn, on the URL's port: never someone else's broker."""
    port = str(urlsplit(url).port)
    env = {**os.environ, f"KEYBUS_{backend.upper()}_PORT": port}
    for command in commands:
        process = await asyncio.create_subprocess_exec(
            f"tools/{backend}/{backend}.sh",
            command,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        code = await asyncio.wait_for(process.wait(), 120)
        assert code == 0, f"{backend}.sh {command} exited with {code}"


async def restart_broker(backend: str, url: str) -> None:
    """Stop the broker and start it again on the same data."""
    if backend == "kafka":
        await broker(backend, url, "stop", "start")
    else:
        await broker(backend, url, "restart-keep-data")


async def freeze_broker(backend: str, url: str, seconds: float) -> None:
    """SIGSTOP the broker's process for ``seconds`` (a long GC or VM pause of the broker
    itself: connections stay open, nothing answers), then SIGCONT — always, even if the
    wait is cancelled."""
    port = str(urlsplit(url).port)
    process = await asyncio.create_subprocess_exec(
        f"tools/{backend}/{backend}.sh",
        "pid",
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, f"KEYBUS_{backend.upper()}_PORT": port},
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, f"no {backend} broker runs on port {port}"
    pid = int(out.split()[-1])
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


async def ensure_broker(backend: str, url: str) -> None:
    """Start the broker on the data it kept if a failed restart left it down (both
    commands do nothing to a broker that runs)."""
    await broker(backend, url, "start")


@dataclass
class Chaos:
    """The seeded controller: every few seconds it SIGKILLs a member (and starts a
    replacement) or SIGSTOPs one for longer than ``ownership_timeout`` (then SIGCONT);
    a quarter of the way through, the broker itself is frozen (SIGSTOP) for longer than
    ``ownership_timeout``; halfway through, the broker restarts. At most one member is
    frozen at a time, so the group keeps making progress."""

    rng: random.Random
    spawn: Callable[[], Awaitable[Member]]
    restart: Callable[[], Awaitable[None]]
    ownership_timeout: float
    freeze_broker: Callable[[float], Awaitable[None]] | None = None
    members: list[Member] = field(default_factory=list)  # every incarnation
    kills: list[str] = field(default_factory=list)
    pauses: list[tuple[str, float]] = field(default_factory=list)
    restarts: int = 0
    broker_pauses: list[float] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, what)
    _thawing: set[asyncio.Task[None]] = field(default_factory=set)

    def live(self) -> list[Member]:
        return [m for m in self.members if m.alive and not m.frozen]

    async def run(self, seconds: float) -> None:
        begun = time.monotonic()
        end, restart_at = begun + seconds, begun + seconds / 2
        freeze_at = begun + seconds / 4
        while True:
            await asyncio.sleep(self.rng.uniform(3.0, 6.0))
            if time.monotonic() >= end:
                return
            if (
                self.freeze_broker is not None
                and not self.broker_pauses
                and time.monotonic() >= freeze_at
            ):
                await self.settle()  # one frozen process at a time: the broker now
                frozen_for = self.ownership_timeout + self.rng.uniform(1.0, 3.0)
                self.note(f"broker SIGSTOP for {frozen_for:.1f} s")
                self.broker_pauses.append(frozen_for)
                await self.freeze_broker(frozen_for)
                self.note("broker SIGCONT")
            elif not self.restarts and time.monotonic() >= restart_at:
                self.note("broker stops")
                await self.restart()
                self.restarts += 1
                self.note("broker restarted")
            elif not self.pauses or (self.kills and self.rng.random() < 0.5):
                await self.pause()
            else:
                await self.kill()

    async def pause(self) -> None:
        if any(m.frozen for m in self.members):
            return await self.kill()
        member = self.rng.choice(self.live())
        seconds = self.ownership_timeout + self.rng.uniform(2.0, 5.0)
        member.freeze()
        self.note(f"SIGSTOP {member.name} for {seconds:.1f} s")
        self.pauses.append((member.name, seconds))
        task = asyncio.create_task(self._thaw_after(member, seconds))
        self._thawing.add(task)
        task.add_done_callback(self._thawing.discard)

    async def _thaw_after(self, member: Member, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if member.alive:
            member.thaw()
            self.note(f"SIGCONT {member.name}")

    async def kill(self) -> None:
        member = self.rng.choice(self.live())
        await member.kill()
        self.note(f"SIGKILL {member.name}")
        self.kills.append(member.name)
        replacement = await self.spawn()
        self.members.append(replacement)
        await replacement.ready()
        self.note(f"{replacement.name} ready")

    def note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    def timeline(self, since: float) -> str:
        return ", ".join(f"{at - since:.1f} {what}" for at, what in self.events)

    async def settle(self) -> None:
        """Thaw whatever is still frozen (the controller's time is up)."""
        for task in list(self._thawing):
            task.cancel()
        await asyncio.gather(*self._thawing, return_exceptions=True)
        for member in self.members:
            if member.frozen and member.alive:
                member.thaw()
