"""Where the figures were measured: machine, load, Python, client and broker versions, and
the settings that shape the numbers (acks, compression, linger, ack policy, batches).

A broker on this machine is also found by the port it listens on, for its version (Kafka
does not report one over its protocol) and its CPU time per run."""

from __future__ import annotations

import contextlib
import glob
import os
import platform
import re
import sys
from typing import Any
from urllib.parse import urlsplit

import keybus

__all__ = ["BrokerProcess", "client_versions", "environment", "load_average", "settings"]


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def client_versions() -> dict[str, str]:
    versions = {"keybus": keybus.__version__}
    with contextlib.suppress(ImportError):
        import confluent_kafka

        version: Any = confluent_kafka.version()  # a str now; (str, int) in older releases
        versions["confluent-kafka"] = version if isinstance(version, str) else version[0]
        versions["librdkafka"] = confluent_kafka.libversion()[0]
    with contextlib.suppress(ImportError):
        from nats.aio.client import __version__ as nats_version

        versions["nats-py"] = str(nats_version)
    return versions


def settings(backend: str) -> dict[str, Any]:
    """The settings of the keybus side and of the raw baseline that shape the figures."""
    subscribe = {"max_concurrency": 256, "max_in_flight": 1024, "ordering": "per aggregate"}
    if backend == "kafka":
        from keybus.transports.kafka.config import CONSUMER_DEFAULTS, PRODUCER_DEFAULTS

        keys = ("acks", "enable.idempotence", "compression.type", "linger.ms")
        producer = {k: PRODUCER_DEFAULTS[k] for k in (*keys, "batch.num.messages", "partitioner")}
        return {
            "producer": producer,
            "consumer": {
                k: CONSUMER_DEFAULTS[k]
                for k in ("partition.assignment.strategy", "fetch.wait.max.ms", "auto.offset.reset")
            }
            | {"fetch_batch": 500, "commit": "done prefix, async every 0.5 s"},
            "subscribe": subscribe,
            "raw": "same producer settings, every produce awaits its delivery report; consumer "
            "batches of 500 handed to the loop, one ordered lane per partition, async commit "
            "per batch",
        }
    if backend == "nats":
        from keybus.transports.nats.options import NatsOptions

        options = NatsOptions()
        return {
            "stream": {"storage": "file", "duplicate_window_s": options.duplicate_window},
            "publish": {"ack": "PubAck awaited", "max_pending": options.max_pending_publishes},
            "consumer": {
                "ack_policy": "AckPolicy.ALL (done prefix, one ack-all per 5 ms)",
                "fetch_batch": options.fetch_batch,
                "max_ack_pending": options.max_ack_pending,
                "pull": "one durable pull consumer per partition",
            },
            "subscribe": subscribe,
            "raw": "nats-py publish_async, each PubAck awaited; one durable pull consumer per "
            "partition, batches of 512, AckPolicy.ALL on every full batch",
        }
    return {"subscribe": subscribe, "broker": "in this process (memory://)"}


class BrokerProcess:
    """A broker process on this machine, found by the TCP port it listens on."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    @classmethod
    def listening_on(cls, url: str) -> BrokerProcess | None:
        first = url.split("://", 1)[-1].split(",")[0]
        parts = urlsplit(f"//{first}")
        if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.port is None:
            return None
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == parts.port:
                        inodes.add(f"socket:[{fields[9]}]")
        for fd in glob.glob("/proc/[0-9]*/fd/*"):
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return cls(int(fd.split("/")[2]))
        return None

    def cpu_seconds(self) -> float | None:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kafka_version(self) -> str | None:
        """The release in a Kafka broker's classpath (``kafka_2.13-4.3.1.jar``, ...)."""
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            return None
        for arg in args:
            for entry in arg.split(":"):
                paths = glob.glob(entry) if "*" in entry else [entry]
                for path in paths:
                    found = re.search(r"(?:kafka_[\d.]+|kafka-server)-(\d[\w.]*)\.jar$", path)
                    if found:
                        return found.group(1)
        return None


async def _nats_version(url: str) -> str | None:
    try:
        import nats
    except ImportError:
        return None
    try:
        nc = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=0)
    except Exception:
        return None
    try:
        version = nc.connected_server_version
        return f"{version.major}.{version.minor}.{version.patch}"
    finally:
        await nc.close()


async def broker_version(backend: str, url: str) -> str | None:
    if backend == "nats":
        return await _nats_version(url)
    if backend == "kafka":
        process = BrokerProcess.listening_on(url)
        found = process.kafka_version() if process else None
        # The Kafka protocol reports API versions, not the release.
        return found or "unknown (not a local process)"
    return keybus.__version__ if backend == "memory" else None


async def environment(urls: dict[str, str]) -> dict[str, Any]:
    """The environment block for the backends that run (``{backend: url}``)."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average_start": load_average(),
        "load_average_end": None,  # filled in when the bench ends
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "clients": client_versions(),
        "brokers": {
            backend: {"url": url, "version": await broker_version(backend, url)}
            for backend, url in urls.items()
        },
        "settings": {backend: settings(backend) for backend in urls},
    }
