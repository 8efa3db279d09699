"""A TCP proxy in front of the NATS server, for cutting and black-holing connections.

``async with NatsProxy(upstream_url) as proxy``: clients connect to ``proxy.url``.
``proxy.blackhole = True`` silently drops everything the server sends (the client's
bytes still reach the server: a connection whose replies vanish, as in a half-broken
network); ``proxy.cut()`` closes every connection (the client reconnects through the
proxy); ``proxy.drop = predicate`` drops each message the server sends (``MSG``/``HMSG``)
whose payload the predicate accepts — a delivery lost on the wire, which the server
counts as delivered; ``proxy.refuse = True`` closes every new connection at once (a
server that cannot be reached again); ``await proxy.inject(data)`` writes raw protocol
bytes to the server on every connection, as if the client had sent them. Leaving the
block closes the listener, every connection and every task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit


class NatsProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 4222)
        self.blackhole = False
        self.drop: Callable[[bytes], bool] | None = None
        self.refuse = False
        self.refused = 0  # connections closed at once because of ``refuse``
        self.connections = 0  # accepted so far
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._to_server: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> NatsProxy:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"nats://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _on_client(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        if self.refuse:
            self.refused += 1
            client_w.transport.abort()
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_w.close()
            return
        self.connections += 1
        self._writers.update((client_w, server_w))
        self._to_server.add(server_w)
        for task in (
            asyncio.create_task(self._pipe(client_r, server_w, from_server=False)),
            asyncio.create_task(self._pipe(server_r, client_w, from_server=True)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_server: bool
    ) -> None:
        held = bytearray()  # the start of a server message not wholly read yet
        try:
            while data := await reader.read(65536):
                if from_server and self.blackhole:
                    continue
                if from_server and (self.drop is not None or held):
                    held += data
                    data = self._without_dropped(held)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            self._to_server.discard(writer)
            writer.close()

    def _without_dropped(self, held: bytearray) -> bytes:
        """The complete protocol frames at the front of ``held`` (taken out of it), less
        the messages ``drop`` accepts. Server frames are lines, except ``MSG``/``HMSG``:
        a line ending in the byte count (headers and payload for ``HMSG``, whose header
        count comes before it), then that many bytes and CRLF."""
        out = bytearray()
        start = 0
        while (end := held.find(b"\r\n", start)) >= 0:
            line = bytes(held[start:end])
            fields = line.split()
            stop = end + 2
            payload = None
            if fields and fields[0].upper() in (b"MSG", b"HMSG"):
                size = int(fields[-1])
                if len(held) < stop + size + 2:
                    break  # the rest comes with the next read
                header_size = int(fields[-2]) if fields[0].upper() == b"HMSG" else 0
                payload = bytes(held[stop + header_size : stop + size])
                stop += size + 2
            drop = self.drop
            if payload is None or drop is None or not drop(payload):
                out += held[start:stop]
            start = stop
        del held[:start]
        return bytes(out)

    async def inject(self, data: bytes) -> None:
        """Send ``data`` to the server on every open connection, between the client's own
        bytes (write whole protocol lines: they must not split one of the client's)."""
        for writer in list(self._to_server):
            writer.write(data)
            await writer.drain()

    def cut(self) -> None:
        """Close every open connection (new ones are still accepted)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
