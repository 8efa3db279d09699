"""``keybus.connect``: pick a transport from the URL and hand back a connected bus."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Generator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from keybus.bus import EventBus
from keybus.deadline import Deadline
from keybus.errors import ConnectError, KeybusError
from keybus.registry import make_transport
from keybus.topics import TopicConfig

__all__ = ["Connector", "connect", "connect_from_config"]

# How often the lag gauges are read from the broker (metrics=, seconds).
LAG_INTERVAL = 15.0

_BUS_OPTIONS = ("topic_config", "create_topics", "middleware", "subscribe_defaults")


class Connector:
    """What :func:`connect` returns: ``await`` it for a bus, or use it as
    ``async with connect(...) as bus`` to close the bus on exit."""

    def __init__(self, url: str, group: str | None, options: dict[str, Any]) -> None:
        self._url = url
        self._group = group
        self._options = options
        self._bus: EventBus | None = None

    async def _connect(self) -> EventBus:
        options = dict(self._options)
        bus_options = {k: options.pop(k) for k in _BUS_OPTIONS if k in options}
        connect_timeout = float(options.pop("connect_timeout", 10.0))
        # Checked before connecting: raising afterwards would leave the transport open.
        topic_config = bus_options.get("topic_config")
        if topic_config is not None and not isinstance(topic_config, TopicConfig):
            raise TypeError("topic_config must be a keybus.TopicConfig")
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be > 0")
        metrics, tracing = options.pop("metrics", None), options.pop("tracing", None)
        lag_interval = options.pop("lag_interval", LAG_INTERVAL)
        if type(lag_interval) not in (int, float) or not lag_interval > 0:
            raise ValueError(f"lag_interval must be a number of seconds > 0, got {lag_interval!r}")
        if metrics is not None or tracing is not None:
            # Imported only then: `import keybus` stays light.
            from keybus.telemetry.hooks import build

            bus_options["telemetry"] = build(metrics, tracing, float(lag_interval))
        url = self._url
        scheme = urlsplit(url).scheme.lower() if "://" in url else ""
        transport = make_transport(url, scheme, options)
        deadline = Deadline.after(connect_timeout)
        try:
            # The transport sizes its steps from the deadline; the wait is the backstop.
            await asyncio.wait_for(transport.connect(deadline), connect_timeout)
        except BaseException as exc:
            # Whatever happened, nothing the attempt started is left behind.
            await transport.close(Deadline.after(transport.close_budget))
            if isinstance(exc, TimeoutError):
                raise ConnectError(url, f"no answer within {connect_timeout:g} s") from None
            if isinstance(exc, ConnectError) or not isinstance(exc, Exception):
                raise
            if isinstance(exc, KeybusError):
                raise ConnectError(url, str(exc)) from exc
            raise ConnectError(url, str(exc) or type(exc).__name__) from exc
        return EventBus(transport, group=self._group, **bus_options)

    def __await__(self) -> Generator[Any, None, EventBus]:
        return self._connect().__await__()

    async def __aenter__(self) -> EventBus:
        self._bus = await self._connect()
        return self._bus

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bus is not None:
            await self._bus.close()


def connect(url: str, *, group: str | None = None, **options: Any) -> Connector:
    """Connect to ``memory://[NAME]``, ``kafka://host:port[,host:port]`` or
    ``nats://host:port``. ``group`` is the consumer group (durable name): buses with the
    same group share the work of a subscription; different groups each get every message.

    Options: ``connect_timeout`` (s, default 10), ``topic_config`` (a :class:`TopicConfig`
    for topics the bus creates), ``create_topics`` (default True), ``middleware`` (a list
    run around every subscription's attempts, see :mod:`keybus.middleware`),
    ``metrics`` (True or a ``prometheus_client.CollectorRegistry``: Prometheus metrics,
    extra ``keybus[prometheus]``), ``tracing`` (True or an OpenTelemetry
    ``TracerProvider``: spans and trace propagation, extra ``keybus[otel]``), plus the
    backend's options.
    """
    if type(url) is not str:
        raise TypeError("url must be a str")
    return Connector(url, group, options)


def connect_from_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Connector:
    """:func:`connect` with what a configuration says: ``source`` is a ``.toml``,
    ``.yaml``/``.yml`` or ``.json`` file, or a mapping; ``KEYBUS_*`` environment variables
    override it (nested keys joined by ``__``); ``overrides`` (any ``connect`` option, and
    ``group``) override both. A bad value raises :class:`~keybus.errors.ConfigError`
    naming the key. See :mod:`keybus.config`."""
    from keybus.config import load_config  # the loader is needed only here

    config = load_config(source, environ=environ)
    options = {**config.connect_options(), **overrides}
    group = options.pop("group", config.group)
    return connect(config.url, group=group, **options)
