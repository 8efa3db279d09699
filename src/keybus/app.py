"""``keybus.App``: a service declared as handlers, run until told to stop.

::

    app = keybus.App("kafka://broker:9092", group="billing")

    @app.subscribe_envelope("orders", max_concurrency=64)
    async def on_order(envelope: keybus.Envelope) -> None:
        await app.bus.publish_envelope("invoices", ...)

    asyncio.run(app.run())        # or: keybus run myservice:app [--workers 2]

``run()`` connects, subscribes every handler, runs the startup hooks, and waits until it
is stopped: :meth:`App.stop`, a cancellation, or — when it installs them (the default
in the main thread) — SIGTERM/SIGINT. The first signal closes gracefully (fetching stops,
running handlers get ``close_timeout`` to finish, what is done is committed); a second
one cuts the close short (handlers cancelled at once; what is done is still committed).
Its result says which: :data:`EXIT_OK` after a graceful stop, :data:`EXIT_FORCED` after
a second signal. Handlers stay plain ``async def`` functions, testable on ``memory://``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from keybus.bus import EventBus
from keybus.connect import connect
from keybus.engine import Handler

__all__ = ["EXIT_FAILED", "EXIT_FORCED", "EXIT_OK", "App"]

log = logging.getLogger("keybus.app")

EXIT_OK = 0
"""Stopped and closed gracefully (a signal, ``stop()``, a cancellation)."""
EXIT_FAILED = 1
"""It could not start (connect, subscribe or a startup hook failed)."""
EXIT_FORCED = 3
"""A second signal cut the close short: running handlers were cancelled."""

H = TypeVar("H", bound=Handler)
Hook = Callable[[], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class _Route:
    topic: str
    handler: Handler
    options: Mapping[str, Any]
    envelopes: bool


class App:
    """A service: a connection (a URL and options, or a configuration), its handlers and
    hooks. ``close_timeout`` bounds the graceful close (seconds)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        group: str | None = None,
        close_timeout: float = 10.0,
        **options: Any,
    ) -> None:
        self.url = url
        self.group = group
        self.close_timeout = close_timeout
        self.options = options
        self._config_source: Any = None
        self._routes: list[_Route] = []
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._bus: EventBus | None = None
        self._stop: asyncio.Event | None = None
        self._signals = 0
        self._forced: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, source: Any, *, close_timeout: float = 10.0, **overrides: Any) -> App:
        """An app whose connection comes from a configuration (a file or a mapping, with
        ``KEYBUS_*`` overrides: see :func:`keybus.connect_from_config`), read at run."""
        app = cls(None, close_timeout=close_timeout, **overrides)
        app.use_config(source)
        return app

    def use_config(self, source: Any) -> None:
        """Take the connection from a configuration (``keybus run --config FILE``); the
        app's own keyword options still override it."""
        self._config_source = source

    # -- declaring -------------------------------------------------------------------

    def subscribe(self, topic: str, **options: Any) -> Callable[[H], H]:
        """Decorator: handle ``topic``'s raw messages (``bus.subscribe``'s options)."""
        return self._route(topic, options, envelopes=False)

    def subscribe_envelope(self, topic: str, **options: Any) -> Callable[[H], H]:
        """Decorator: handle ``topic``'s envelopes (``bus.subscribe_envelope``'s options)."""
        return self._route(topic, options, envelopes=True)

    def _route(self, topic: str, options: dict[str, Any], *, envelopes: bool) -> Callable[[H], H]:
        def register(handler: H) -> H:
            if not callable(handler):
                raise TypeError("a handler must be callable")
            self._routes.append(_Route(topic, handler, dict(options), envelopes))
            return handler

        return register

    def on_startup(self, hook: Hook) -> Hook:
        """Decorator: run ``hook()`` once connected and subscribed, before waiting."""
        self._startup.append(hook)
        return hook

    def on_shutdown(self, hook: Hook) -> Hook:
        """Decorator: run ``hook()`` after the bus closed."""
        self._shutdown.append(hook)
        return hook

    @property
    def bus(self) -> EventBus:
        """The running bus (to publish from handlers and hooks)."""
        if self._bus is None:
            raise RuntimeError("the app is not running")
        return self._bus

    # -- running ---------------------------------------------------------------------

    def stop(self) -> None:
        """Close gracefully (as the first SIGTERM does)."""
        if self._stop is not None:
            self._stop.set()

    async def run(self, *, install_signal_handlers: bool | None = None) -> int:
        """Connect, subscribe, run the startup hooks and wait; then close and run the
        shutdown hooks. Returns :data:`EXIT_OK` or :data:`EXIT_FORCED`; raises what made
        it fail to start (after closing what it opened)."""
        if self._stop is not None:
            raise RuntimeError("the app is already running")
        self._stop = asyncio.Event()
        self._signals = 0
        loop = asyncio.get_running_loop()
        if install_signal_handlers is None:
            install_signal_handlers = threading.current_thread() is threading.main_thread()
        installed: list[signal.Signals] = []
        cancelled = False
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        try:
            self._bus = await self._connect()
            try:
                for route in self._routes:
                    if route.envelopes:
                        await self._bus.subscribe_envelope(
                            route.topic, route.handler, **route.options
                        )
                    else:
                        await self._bus.subscribe(route.topic, route.handler, **route.options)
                for hook in self._startup:
                    await _call(hook)
                log.info(
                    "keybus: app running on %s (group %s, pid %d): %s",
                    self._bus.url,
                    self._bus.group,
                    os.getpid(),
                    ", ".join(sorted({r.topic for r in self._routes})) or "no subscriptions",
                )
                try:
                    await self._stop.wait()
                except asyncio.CancelledError:
                    cancelled = True  # closed gracefully below, then passed on
            finally:
                await self._close()
                if self._forced is not None:
                    await self._forced  # ends with the close it hastened
            for hook in self._shutdown:
                await _call(hook)
            if cancelled:
                raise asyncio.CancelledError
            return EXIT_FORCED if self._signals > 1 else EXIT_OK
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            self._bus = None
            self._stop = None

    async def _connect(self) -> EventBus:
        if self._config_source is not None:
            from keybus.connect import connect_from_config

            options = dict(self.options)
            if self.group is not None:  # App.from_config(source, group=...) overrides it
                options["group"] = self.group
            return await connect_from_config(self._config_source, **options)
        if self.url is None:
            raise ValueError("an App needs a URL or a configuration (App.from_config)")
        return await connect(self.url, group=self.group, **self.options)

    async def _close(self) -> None:
        bus = self._bus
        if bus is None:
            return
        log.info("keybus: app closing (up to %g s for running handlers)", self.close_timeout)
        await asyncio.shield(bus.close(self.close_timeout))

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("keybus: %s: closing gracefully", sig.name)
            if self._stop is not None:
                self._stop.set()
            return
        log.warning("keybus: %s again: cancelling running handlers now", sig.name)
        bus = self._bus
        if bus is not None:
            # A close bounded by its own (zero) timeout hastens the one running.
            self._forced = asyncio.get_running_loop().create_task(
                bus.close(0), name="keybus-app-force-close"
            )


async def _call(hook: Hook) -> None:
    result = hook()
    if result is not None:
        await result
