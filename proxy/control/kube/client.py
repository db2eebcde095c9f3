"""A small Kubernetes API client on aiohttp: JSON requests, and watch streams split into lines
by this module (not by the HTTP library, whose line reader has its own length limit).

Why not a Kubernetes client library: the maintained async ones mishandle expired watches or
miss deletions across a relist, and none gives the pod-by-IP index the proxy needs; the part of
the API an informer uses is small (list, watch, create an Event).

The session never honours HTTP(S)_PROXY from the environment (`trust_env=False`): the proxy's
own pod may carry those variables for its workloads' sake, and the API server must be reached
directly. A 401 makes the token source re-read its file (bound tokens rotate) and the request
is retried once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import aiohttp

from proxy import __version__
from proxy.control.kube.config import ClusterConfig
from proxy.metrics import KUBE_TOKEN_REREADS

# A whole LIST page or request answer. 500 pods of a few KiB each are a few MB; 256 MiB only
# stops a runaway answer from taking the proxy's memory.
MAX_RESPONSE_BYTES: Final = 256 << 20
# One watch event (one JSON line). etcd refuses values over 1.5 MiB by default and the API
# server's request limit is 3 MiB, but objects with large annotations reach several MiB on
# clusters that raised those limits; 16 MiB keeps a hostile or broken stream bounded.
MAX_WATCH_LINE_BYTES: Final = 16 << 20
# An ordinary request (a LIST page, an Event): the API server's own default is 60 s.
REQUEST_TIMEOUT_SECONDS: Final = 60.0
CONNECT_TIMEOUT_SECONDS: Final = 10.0
_ERROR_BODY_BYTES: Final = 64 << 10
_MAX_RETRY_AFTER_SECONDS: Final = 300.0


class ApiError(Exception):
    """The API server answered with an error status (a `Status` object, usually)."""

    def __init__(
        self, status: int, reason: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class WatchStreamError(Exception):
    """A watch stream that cannot be read on: cut inside a line, or a line over the cap."""


class LineTooLong(WatchStreamError):
    pass


class WatchInactive(WatchStreamError):
    """Nothing, not even a bookmark, arrived within the inactivity timeout."""


class LineSplitter:
    """Bytes in, complete lines out. A line may arrive in any number of pieces, split anywhere
    (inside a UTF-8 character too: lines are decoded only when whole). Each byte is scanned
    for a newline once, so a 5 MiB line in 1-byte pieces costs O(n), not O(n^2)."""

    __slots__ = ("_buffer", "_max", "_scanned")

    def __init__(self, max_line_bytes: int = MAX_WATCH_LINE_BYTES) -> None:
        self._buffer = bytearray()
        self._scanned = 0
        self._max = max_line_bytes

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        lines: list[bytes] = []
        start = 0
        position = self._scanned
        while (newline := buffer.find(b"\n", position)) >= 0:
            line = bytes(buffer[start:newline]).rstrip(b"\r")
            if line:
                lines.append(line)
            start = position = newline + 1
        if start:
            del buffer[:start]
        self._scanned = len(buffer)
        if len(buffer) > self._max:
            raise LineTooLong(f"a watch line exceeds {self._max} bytes")
        return lines

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line."""
        return len(self._buffer)


class WatchStream:
    """The lines of one watch response, with an inactivity deadline per line."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        inactivity_timeout: float,
        max_line_bytes: int = MAX_WATCH_LINE_BYTES,
    ) -> None:
        self._response = response
        self._splitter = LineSplitter(max_line_bytes)
        self._lines: collections.deque[bytes] = collections.deque()
        self._inactivity = inactivity_timeout
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + inactivity_timeout
        self._eof = False

    @property
    def finished(self) -> bool:
        """Read to the server's clean end (the connection may be reused)."""
        return self._eof and not self._splitter.pending

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> bytes:
        while not self._lines:
            if self._eof:
                if self._splitter.pending:
                    raise WatchStreamError("the watch stream ended inside a line")
                raise StopAsyncIteration
            remaining = self._deadline - self._loop.time()
            if remaining <= 0:
                raise WatchInactive(f"no watch line for {self._inactivity:g}s")
            try:
                async with asyncio.timeout(remaining):
                    data = await self._response.content.readany()
            except TimeoutError:
                raise WatchInactive(f"no watch line for {self._inactivity:g}s") from None
            if not data:
                self._eof = True
                continue
            self._lines.extend(self._splitter.feed(data))
        self._deadline = self._loop.time() + self._inactivity
        return self._lines.popleft()


class KubeClient:
    """One aiohttp session to one API server. Create it anywhere; it connects on first use."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.config = config
        self._request_timeout = request_timeout
        self._max_response = max_response_bytes
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            connector = aiohttp.TCPConnector(
                ssl=self.config.ssl_context if self.config.ssl_context is not None else False
            )
            self._http = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,  # never HTTP(S)_PROXY: see the module docstring
                headers={"User-Agent": f"outgate/{__version__}", "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=CONNECT_TIMEOUT_SECONDS,
                    sock_connect=CONNECT_TIMEOUT_SECONDS,
                ),
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _headers(self) -> dict[str, str]:
        token = self.config.token.get() if self.config.token is not None else None
        return {"Authorization": f"Bearer {token}"} if token else {}

    @contextlib.asynccontextmanager
    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
        content_type: str = "application/json",
        timeout: aiohttp.ClientTimeout,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        url = self.config.server + path
        token = self.config.token
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            headers = self._headers()
            if data is not None:
                headers["Content-Type"] = content_type
            response = await self._session().request(
                method,
                url,
                params=params,
                data=data,
                headers=headers,
                timeout=timeout,
                server_hostname=self.config.tls_server_name,
            )
            try:
                if response.status == 401 and attempt == 1 and token and token.rereadable:
                    # A bound token rotated under us: read the file again, retry once.
                    KUBE_TOKEN_REREADS.inc()
                    token.invalidate()
                    continue
                if response.status >= 400:
                    raise await _api_error(response)
                yield response
                return
            finally:
                response.release()

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
        content_type: str = "application/json",
    ) -> Any:
        """The JSON answer of one request; ApiError for an error status. `content_type` says how
        the body is meant (a PATCH: application/merge-patch+json)."""
        timeout = aiohttp.ClientTimeout(
            total=self._request_timeout, sock_connect=CONNECT_TIMEOUT_SECONDS
        )
        request = self._request(
            method, path, params=params, body=body, content_type=content_type, timeout=timeout
        )
        async with request as resp:
            data = bytearray()
            try:
                async for chunk in resp.content.iter_any():
                    data += chunk
                    if len(data) > self._max_response:
                        raise ApiError(
                            resp.status, "TooLarge", f"answer over {self._max_response} bytes"
                        )
            except BaseException:
                _abort(resp)
                raise
        return json.loads(data)

    @contextlib.asynccontextmanager
    async def watch(
        self,
        path: str,
        params: Mapping[str, str],
        *,
        inactivity_timeout: float,
        max_line_bytes: int = MAX_WATCH_LINE_BYTES,
    ) -> AsyncIterator[WatchStream]:
        """A watch response as a stream of lines. No total timeout: the server ends the watch
        after `timeoutSeconds`, and the stream's inactivity deadline catches a stalled one."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_SECONDS)
        async with self._request("GET", path, params=params, timeout=timeout) as response:
            stream = WatchStream(
                response, inactivity_timeout=inactivity_timeout, max_line_bytes=max_line_bytes
            )
            try:
                yield stream
            finally:
                if not stream.finished:
                    _abort(response)


def _abort(response: aiohttp.ClientResponse) -> None:
    """Drop a connection whose answer was not read to its end: it cannot be reused, and a
    graceful TLS close would wait on a peer that may be gone (a stalled watch)."""
    connection = response.connection
    if connection is not None and connection.transport is not None:
        connection.transport.abort()


async def _api_error(response: aiohttp.ClientResponse) -> ApiError:
    raw = b""
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        raw = await response.content.read(_ERROR_BODY_BYTES)
    reason, message = response.reason or "", raw.decode("utf-8", "replace")[:512]
    with contextlib.suppress(ValueError):
        status = json.loads(raw)
        if isinstance(status, dict):
            reason = str(status.get("reason") or reason)
            message = str(status.get("message") or message)
    retry_after: float | None = None
    header = response.headers.get("Retry-After", "")
    if header.strip().isdigit():
        retry_after = min(float(header.strip()), _MAX_RETRY_AFTER_SECONDS)
    return ApiError(response.status, reason, message, retry_after=retry_after)
