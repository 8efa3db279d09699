"""``keybus.connect``: pick a transport from the URL and hand back a connected bus."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from keybus.bus import EventBus
from keybus.errors import ConnectError
from keybus.transports.base import TopicConfig, Transport

__all__ = ["Connector", "connect"]

_BUS_OPTIONS = ("topic_config", "create_topics")


def _make_transport(url: str, options: dict[str, Any]) -> Transport:
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "memory":
        from keybus.transports.memory import MemoryTransport

        if options:
            raise TypeError(f"unknown options for memory://: {sorted(options)}")
        return MemoryTransport(url, url.split("://", 1)[1].strip("/"))
    if scheme == "kafka":
        try:
            from keybus.transports.kafka import KafkaTransport  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise ConnectError(url, f"the Kafka backend is not available: {exc}") from exc
        transport: Transport = KafkaTransport(url, **options)
        return transport
    if scheme == "nats":
        try:
            from keybus.transports.nats import NatsTransport  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise ConnectError(url, f"the NATS backend is not available: {exc}") from exc
        transport = NatsTransport(url, **options)
        return transport
    raise ConnectError(url, f"unknown scheme {scheme!r}: use memory://, kafka:// or nats://")


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
        transport = _make_transport(self._url, options)
        try:
            await asyncio.wait_for(transport.connect(), connect_timeout)
        except TimeoutError:
            await transport.close()
            raise ConnectError(self._url, f"no answer within {connect_timeout:g} s") from None
        except ConnectError:
            await transport.close()
            raise
        except Exception as exc:
            await transport.close()
            raise ConnectError(self._url, str(exc) or type(exc).__name__) from exc
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
    for topics the bus creates), ``create_topics`` (default True), plus backend options.
    """
    if type(url) is not str:
        raise TypeError("url must be a str")
    return Connector(url, group, options)
