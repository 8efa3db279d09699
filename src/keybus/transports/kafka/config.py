"""The transport's options, checked once, and the librdkafka configs built from them.

Our librdkafka defaults live here with the reason for each; a user's
``producer_config`` / ``consumer_config`` / ``admin_config`` is merged over them. Every
callback a config carries is wrapped by :func:`guard` (see there why).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keybus.dedupe import check_window
from keybus.security import SASL, TLS
from keybus.transports.kafka.errors import translate
from keybus.transports.kafka.security import librdkafka_security, parse_security

__all__ = [
    "NO_DEDUPE",
    "OWNERSHIP_MARGIN",
    "STEP_MARGIN",
    "KafkaSettings",
    "bootstrap_servers",
    "guard",
    "guarded",
    "is_eager",
]

log = logging.getLogger("keybus.kafka")
_librdkafka_log = logging.getLogger("keybus.kafka.librdkafka")

OWNERSHIP_MARGIN = 1.0
"""How much sooner than the coordinator could expire this member's session its own
ownership deadline passes (seconds): the coordinator's clock and ours start the session
at slightly different moments, and a loaded loop checks the deadline a little late."""

STEP_MARGIN = 0.2
"""How long before its deadline a step of ours stops waiting: the core cuts a step off
at its deadline, and one that ends just before it still reports why it gave up (and
does what it must after the wait) instead of being cancelled mid-way."""

NO_DEDUPE = (
    "dedupe_window: Kafka cannot de-duplicate publishes by event id (no broker keeps a "
    "window of ids; its idempotent producer, on by default, drops only its own retries of "
    "one send). Leave it None and make handlers idempotent by event_id, or use NATS"
)
"""Why ``dedupe_window`` is refused on Kafka, and what to do instead."""

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,  # no duplicates or reordering from the producer's retries
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 2,  # concurrent publishes share batches
    "batch.num.messages": 10000,
    # A publish resolves (ack or PublishError) within this, also while the broker is away.
    "message.timeout.ms": 30000,
    "socket.timeout.ms": 10000,
    "topic.metadata.refresh.interval.ms": 10000,
    # Keys land where the Go services' sarama producer puts them (FNV-1a; librdkafka's
    # default CRC32 splits an aggregate published by both across partitions), and where
    # keybus.partitioning puts them on the other backends. docs/interop.md.
    "partitioner": "fnv1a_random",
}

CONSUMER_DEFAULTS: dict[str, Any] = {
    "partition.assignment.strategy": "cooperative-sticky",
    "enable.auto.commit": False,  # only the core's done prefix is ever committed
    "enable.auto.offset.store": False,
    # A new group starts at the earliest record: a message published after subscribe()
    # returned is then never skipped, even if it was written before this member's fetch
    # position was resolved ("latest" would resolve to an offset after it).
    "auto.offset.reset": "earliest",
    # librdkafka's heartbeat thread keeps the session; short timeouts so a crashed member's
    # partitions move within seconds, and a quick heartbeat so members see a rebalance soon.
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 250,
    "socket.timeout.ms": 10000,
    "topic.metadata.refresh.interval.ms": 5000,
    "fetch.wait.max.ms": 100,
    "queued.max.messages.kbytes": 16384,
    "enable.partition.eof": False,
}

ADMIN_DEFAULTS: dict[str, Any] = {"socket.timeout.ms": 10000}

_CALLBACKS = ("error_cb", "stats_cb", "throttle_cb", "oauth_cb")


def bootstrap_servers(url: str) -> str:
    """``kafka://h1:9092,h2:9092/...`` -> ``h1:9092,h2:9092``."""
    rest = url.split("://", 1)[1] if "://" in url else url
    servers = rest.split("/", 1)[0].split("?", 1)[0]
    if not servers:
        raise translate("no bootstrap server in the URL", "connect", url)
    return servers


def is_eager(consumer: Mapping[str, Any]) -> bool:
    """Does a consumer with this librdkafka config rebalance eagerly (``range``,
    ``roundrobin``: every rebalance revokes the member's whole assignment, and the
    callbacks must use ``assign``/``unassign``) rather than cooperatively
    (``cooperative-sticky``, or the KIP-848 ``group.protocol=consumer``:
    ``incremental_assign``/``incremental_unassign``)? confluent-kafka has no call that
    tells (librdkafka's ``rd_kafka_rebalance_protocol`` is not exposed), so it is read
    from the assignors configured: librdkafka refuses a list mixing both kinds."""
    if str(consumer.get("group.protocol", "classic")).strip().lower() == "consumer":
        return False
    strategies = str(consumer.get("partition.assignment.strategy", "range,roundrobin"))
    return "cooperative-sticky" not in {s.strip().lower() for s in strategies.split(",")}


def resets_to_end(consumer: Mapping[str, Any]) -> bool:
    """Does a partition without a committed offset start at its end
    (``auto.offset.reset`` latest/largest/end) rather than its beginning (earliest,
    smallest, beginning; and ``error``, which has no position of its own: the beginning
    skips nothing)?"""
    reset = str(consumer.get("auto.offset.reset", "largest")).strip().lower()
    return reset in {"latest", "largest", "end"}


def guard(callback: Callable[..., Any]) -> Callable[..., Any]:
    """A callback that raises inside ``consume`` makes confluent-kafka discard the batch
    it fetched in that call — records skipped without being handled. Log instead."""

    def guarded(*args: Any) -> Any:
        try:
            return callback(*args)
        except Exception:
            log.exception("keybus: Kafka callback %r failed", callback)
            return None

    return guarded


def guarded(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with a user's librdkafka callbacks wrapped by :func:`guard` (not
    ``oauth_cb``: its exceptions are librdkafka's way to report a token failure)."""
    out = dict(config)
    for name in _CALLBACKS:
        if name != "oauth_cb" and callable(out.get(name)):
            out[name] = guard(out[name])
    return out


@dataclass(kw_only=True)
class KafkaSettings:
    """The Kafka transport's options (``keybus.connect(url, **options)``; an unknown one
    is a ``TypeError``):

    ``tls``: ``True`` (the system's CAs) or a :class:`keybus.TLS` (CA file, client
    certificate and key; not an ``ssl.SSLContext``: librdkafka takes files, a ``TypeError``
    says so); ``sasl``: a :class:`keybus.SASL` (PLAIN, SCRAM-SHA-256/512, OAUTHBEARER with
    a token callable), or a mechanism name with the user and password in the URL
    (``kafka://user:password@host:9093?sasl=SCRAM-SHA-512`` says the same). Both apply to
    the producer, the consumer and the admin client (``security.protocol`` SSL, SASL_SSL
    or SASL_PLAINTEXT; ``keybus.transports.kafka.security``). ``url`` is kept with its
    credentials masked.

    ``producer_config`` / ``consumer_config`` / ``admin_config``: librdkafka settings
    merged over ours (and over the security settings); ``commit_interval`` (s, 0.5): how
    often done offsets are committed asynchronously; ``fetch_batch`` (500): records per
    ``consume`` call; ``assign_timeout`` (s, 30): bound on a subscribe's group join; ``join_settle``
    (s, 3): how long a joining member that got no partition in the first round of a
    cooperative rebalance waits for the second; ``probe_timeout`` (s, 5): the most the
    metadata request that proves the broker reachable at connect may take (the connect's
    deadline may cut it shorter). ``dedupe_window``: only ``None`` (off, as on every
    backend by default); a window is a ``ValueError`` (:data:`NO_DEDUPE`): Kafka has no
    publish-side de-duplication by event id.

    After construction, ``producer``, ``consumer`` and ``admin`` are the librdkafka
    configs (bootstrap servers from the URL, our defaults, the user's settings),
    ``session_timeout`` the consumer's session timeout in seconds, ``request_timeout``
    its request timeout (``socket.timeout.ms``) in seconds, ``ownership_window``
    how long this member's ownership of its partitions is known to last after the
    consumer thread last ran (see ``group_consumer``: the session timeout less a
    heartbeat interval and :data:`OWNERSHIP_MARGIN`), ``eager`` whether
    the consumer's assignor rebalances eagerly (:func:`is_eager`; e.g.
    ``consumer_config={"partition.assignment.strategy": "range"}``, how a keybus member
    joins a group of the Go services' sarama consumers) and ``reset_to_end`` whether a
    partition the group never committed starts at its end (:func:`resets_to_end`).
    """

    url: str
    tls: bool | ssl.SSLContext | TLS | None = None
    sasl: SASL | str | None = None
    producer_config: Mapping[str, Any] | None = None
    consumer_config: Mapping[str, Any] | None = None
    admin_config: Mapping[str, Any] | None = None
    commit_interval: float = 0.5
    fetch_batch: int = 500
    assign_timeout: float = 30.0
    join_settle: float = 3.0
    probe_timeout: float = 5.0
    dedupe_window: float | None = None
    producer: dict[str, Any] = field(init=False, repr=False)
    consumer: dict[str, Any] = field(init=False, repr=False)
    admin: dict[str, Any] = field(init=False, repr=False)
    session_timeout: float = field(init=False)
    request_timeout: float = field(init=False)
    ownership_window: float = field(init=False)
    eager: bool = field(init=False)
    reset_to_end: bool = field(init=False)

    def __post_init__(self) -> None:
        security = parse_security(self.url, self.tls, self.sasl)
        # From here on only the masked URL is kept (it is what bus.url and errors show).
        self.url, self.tls, self.sasl = security.url, security.tls, security.sasl
        servers = bootstrap_servers(security.bare_url)
        if check_window(self.dedupe_window) is not None:
            raise ValueError(NO_DEDUPE)
        if (
            self.commit_interval <= 0
            or self.fetch_batch < 1
            or self.assign_timeout <= 0
            or self.probe_timeout <= 0
        ):
            raise ValueError("commit_interval, fetch_batch, assign_timeout, probe_timeout > 0")
        self.commit_interval = float(self.commit_interval)
        self.fetch_batch = int(self.fetch_batch)
        self.assign_timeout = float(self.assign_timeout)
        self.join_settle = max(0.0, float(self.join_settle))
        self.probe_timeout = float(self.probe_timeout)
        # librdkafka's own log lines go to Python logging (served by the polling threads;
        # the admin client's when we poll it after a request) instead of raw stderr.
        base = {
            "bootstrap.servers": servers,
            "client.id": "keybus",
            "logger": _librdkafka_log,
            **librdkafka_security(security.tls, security.sasl),
        }
        self.producer = {**base, **PRODUCER_DEFAULTS, **dict(self.producer_config or {})}
        self.consumer = {**base, **CONSUMER_DEFAULTS, **dict(self.consumer_config or {})}
        self.admin = {**base, **ADMIN_DEFAULTS, **dict(self.admin_config or {})}
        try:
            self.session_timeout = float(self.consumer.get("session.timeout.ms", 45000)) / 1000
        except (TypeError, ValueError):  # librdkafka rejects it when the consumer is made
            self.session_timeout = 45.0
        try:
            self.request_timeout = float(self.consumer.get("socket.timeout.ms", 60000)) / 1000
        except (TypeError, ValueError):
            self.request_timeout = 60.0
        try:
            heartbeat = float(self.consumer.get("heartbeat.interval.ms", 3000)) / 1000
        except (TypeError, ValueError):
            heartbeat = 3.0
        # The coordinator drops a member one session timeout after its last heartbeat;
        # while the process runs, librdkafka's own thread heartbeats every interval. So a
        # member seen running at T owned its partitions until at least T - heartbeat +
        # session. (Never below a second: a tiny session would lapse under any load.)
        self.ownership_window = max(1.0, self.session_timeout - heartbeat - OWNERSHIP_MARGIN)
        self.eager = is_eager(self.consumer)
        self.reset_to_end = resets_to_end(self.consumer)
