"""A real HTTP(S) origin server on loopback (aiohttp in its own thread), recording what it got.

Besides its fixed routes (/hello, /echo, /sink, /bytes/N, /status/N, /headers, and two real
WebSocket endpoints (RFC 6455, aiohttp's server): /ws greets with one text message, then echoes
every text and binary message until the client closes; /ws-echo only echoes), a test can hand in
more (`routes`, aiohttp route defs)."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from tests.support.loops import settle_transports

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Size of each write when the origin streams a large body.
STREAM_PIECE = 256 * 1024
# The first message `/ws` sends, before any echo: shows the upstream-to-client direction alone.
WS_GREETING = "hello from the websocket origin"
# Loop iterations given to closing transports at stop (close -> connection_lost -> socket close).
# At stop, handlers still running (a body streamed to a proxy worker that was killed, an open
# WebSocket) get this long before they are cancelled; aiohttp's default is 60 s, past the 10 s
# `stop` waits for.
SHUTDOWN_SECONDS = 2.0


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body_bytes: int = 0

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class OriginServer:
    host: str = "127.0.0.1"
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    routes: Sequence[web.RouteDef] = ()
    seen: list[SeenRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()

    # -- handlers -------------------------------------------------------------------------
    def _record(self, request: web.Request, body_bytes: int = 0) -> None:
        with self._lock:
            self.seen.append(
                SeenRequest(
                    method=request.method,
                    path=request.path_qs,
                    headers=[
                        (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers
                    ],
                    body_bytes=body_bytes,
                )
            )

    async def _hello(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(text="hello from origin\n")

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self._record(request, len(body))
        return web.Response(body=body, content_type="application/octet-stream")

    async def _sink(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        total = 0
        async for piece in request.content.iter_chunked(STREAM_PIECE):
            digest.update(piece)
            total += len(piece)
        self._record(request, total)
        return web.json_response({"bytes": total, "sha256": digest.hexdigest()})

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        size = int(request.match_info["n"])
        response = web.StreamResponse()
        if request.query.get("chunked") == "1":
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        piece = b"x" * STREAM_PIECE
        left = size
        while left:
            out = piece[: min(left, STREAM_PIECE)]
            await response.write(out)
            left -= len(out)
        await response.write_eof()
        return response

    async def _status(self, request: web.Request) -> web.Response:
        self._record(request)
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"ETag": '"v1"'})
        return web.Response(status=code, text=f"status {code}\n")

    def _recorded(self, handler: Handler) -> Handler:
        """A test's own handler, with the request recorded like those of the fixed routes."""

        async def handle(request: web.Request) -> web.StreamResponse:
            self._record(request)
            return await handler(request)

        return handle

    async def _websocket_echo(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request)
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type is WSMsgType.TEXT:
                await socket.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await socket.send_bytes(message.data)
        return socket

    async def _headers(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response(
            [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
        )

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request)
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        await ws.send_str(WS_GREETING)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    # -- lifecycle ------------------------------------------------------------------------
    async def _start(self) -> None:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_get("/hello", self._hello)
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_post("/sink", self._sink)
        app.router.add_get("/bytes/{n}", self._bytes)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/headers", self._headers)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/ws-echo", self._websocket_echo)
        app.router.add_routes(
            [
                web.route(r.method, r.path, self._recorded(r.handler), **r.kwargs)
                for r in self.routes
            ]
        )
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await settle_transports()  # a cut connection or WebSocket closing late

    def start(self) -> OriginServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> OriginServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pending_writes(self) -> int:
        """Bytes the origin's open connections hold unsent (their peers are not reading)."""

        async def total() -> int:
            transports = getattr(self._loop, "_transports", None) or {}
            return sum(t.get_write_buffer_size() for t in list(transports.values()))

        return asyncio.run_coroutine_threadsafe(total(), self._loop).result(10)

    def paths_seen(self) -> list[str]:
        with self._lock:
            return [r.path for r in self.seen]
