"""The traffic of the soak (bench/soak.py): one coroutine per kind of exchange, each returning
how many exchanges it sent (each must leave one `decision` and one `close` record) and what
came back ("ok" or the kind of error).

Every kind talks to the proxy over real sockets; the destinations are loopback servers named
through the scripted DNS server, so nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

IO_TIMEOUT = 15.0
KEEPALIVE_REQUESTS = 10
BULK_BYTES = 1 << 20  # per request inside a long tunnel
BULK_REQUESTS = 3
BULK_PAUSE = 0.5  # between the requests of a long tunnel: it stays open a while, mostly idle
SLOW_PIECES = 5
SLOW_PAUSE = 0.3  # the head arrives over 1.2 s, well inside timeouts.header
RESET_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class Ports:
    proxy: int
    admin: int
    origin: int
    raw: int  # the origin that resets mid-body during the upstream_reset fault
    source: str | None = None  # the client's address (a pod's loopback address); any if None


@dataclass(frozen=True, slots=True)
class Outcome:
    exchanges: int  # requests the proxy received whole (each owes two records)
    result: str  # "ok", or what went wrong: "status_504", "timeout", "reset", "short_body"


class Conn:
    """One client connection to the proxy with a buffered reader of HTTP/1.1 responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, p: Ports) -> Conn:
        """A connection to the proxy, from `p.source` when given."""
        local = None if p.source is None else (p.source, 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", p.proxy, local_addr=local)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self) -> tuple[int, dict[str, str]]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        return int(lines[0].split(" ")[1]), headers

    async def response(self) -> tuple[int, dict[str, str], int]:
        """Status, headers and body length (Content-Length framed, or up to the close)."""
        status, headers = await self.head()
        if "content-length" in headers:
            length = int(headers["content-length"])
            left = length
            while left:
                piece = await asyncio.wait_for(self.reader.read(min(left, 1 << 16)), IO_TIMEOUT)
                if not piece:
                    return status, headers, length - left
                left -= len(piece)
            return status, headers, length
        got = 0
        while piece := await asyncio.wait_for(self.reader.read(1 << 16), IO_TIMEOUT):
            got += len(piece)
        return status, headers, got

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _get(url: str, host: str, *, close: bool = True) -> bytes:
    connection = "close" if close else "keep-alive"
    return f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n\r\n".encode()


async def _one(p: Ports, raw: bytes, expect: tuple[int, ...]) -> Outcome:
    conn = await Conn.open(p)
    try:
        await conn.send(raw)
        status, _, _ = await conn.response()
        return Outcome(1, "ok" if status in expect else f"status_{status}")
    finally:
        await conn.close()


async def keepalive(p: Ports) -> Outcome:
    conn = await Conn.open(p)
    sent = 0
    try:
        for index in range(KEEPALIVE_REQUESTS):
            last = index == KEEPALIVE_REQUESTS - 1
            await conn.send(_get(f"http://origin.test:{p.origin}/hello", "origin.test", close=last))
            sent += 1
            status, _, _ = await conn.response()
            if status != 200:
                return Outcome(sent, f"status_{status}")
        return Outcome(sent, "ok")
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return Outcome(sent, error_kind(exc))
    finally:
        await conn.close()


async def _tunnel(p: Ports) -> Conn:
    conn = await Conn.open(p)
    await conn.send(f"CONNECT origin.test:{p.origin} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _ = await conn.head()
    if status != 200:
        await conn.close()
        raise StatusError(status)
    return conn


class StatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"status {status}")
        self.status = status


async def tunnel(p: Ports) -> Outcome:
    conn = await _tunnel(p)
    try:
        await conn.send(_get("/hello", "origin.test"))
        status, _, _ = await conn.response()
        return Outcome(1, "ok" if status == 200 else f"inner_status_{status}")
    finally:
        await conn.close()


async def bulk_tunnel(p: Ports) -> Outcome:
    conn = await _tunnel(p)
    try:
        for index in range(BULK_REQUESTS):
            last = index == BULK_REQUESTS - 1
            await conn.send(_get(f"/bytes/{BULK_BYTES}", "origin.test", close=last))
            status, _, got = await conn.response()
            if status != 200 or got != BULK_BYTES:
                return Outcome(1, "short_body")
            await asyncio.sleep(BULK_PAUSE)
        return Outcome(1, "ok")
    finally:
        await conn.close()


async def denied(p: Ports) -> Outcome:
    return await _one(p, _get("http://denied.test/", "denied.test"), (403,))


async def guarded(p: Ports) -> Outcome:
    """A tunnel to the proxy's own admin port: allowed by policy (loopback), refused by the
    address guard."""
    raw = f"CONNECT 127.0.0.1:{p.admin} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    return await _one(p, raw, (403,))


async def dns_failure(p: Ports) -> Outcome:
    return await _one(p, _get(f"http://nx.test:{p.origin}/", "nx.test"), (502, 503, 504))


async def flaky(p: Ports) -> Outcome:
    """A name whose DNS answers stop during the dns_outage fault (TTL 0: asked every time)."""
    raw = _get(f"http://flaky.test:{p.origin}/hello", "flaky.test")
    return await _one(p, raw, (200,))


async def toggle(p: Ports) -> Outcome:
    """A name the policy storm allows and denies by turns: either answer is right."""
    raw = _get(f"http://toggle.test:{p.origin}/hello", "toggle.test")
    return await _one(p, raw, (200, 403))


async def reset_origin(p: Ports) -> Outcome:
    """An origin that sends a whole body, or, during the upstream_reset fault, resets mid-body."""
    conn = await Conn.open(p)
    try:
        await conn.send(_get(f"http://reset.test:{p.raw}/", "reset.test"))
        status, _, got = await conn.response()
        if status != 200:
            return Outcome(1, f"status_{status}")
        return Outcome(1, "ok" if got == RESET_BODY else "short_body")
    finally:
        await conn.close()


async def slow_client(p: Ports) -> Outcome:
    raw = _get(f"http://origin.test:{p.origin}/hello", "origin.test")
    conn = await Conn.open(p)
    try:
        step = -(-len(raw) // SLOW_PIECES)
        for start in range(0, len(raw), step):
            await conn.send(raw[start : start + step])
            await asyncio.sleep(SLOW_PAUSE)
        status, _, _ = await conn.response()
        return Outcome(1, "ok" if status == 200 else f"status_{status}")
    finally:
        await conn.close()


async def upgrade(p: Ports) -> Outcome:
    """A WebSocket through the proxy: 101, the origin's greeting frame, then a close."""
    key = base64.b64encode(os.urandom(16)).decode()
    raw = (
        f"GET http://origin.test:{p.origin}/ws HTTP/1.1\r\nHost: origin.test:{p.origin}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    conn = await Conn.open(p)
    try:
        await conn.send(raw)
        status, _ = await conn.head()
        if status != 101:
            return Outcome(1, f"status_{status}")
        frame = await asyncio.wait_for(conn.reader.readexactly(2), IO_TIMEOUT)
        await asyncio.wait_for(conn.reader.readexactly(frame[1] & 0x7F), IO_TIMEOUT)
        # A masked close frame (code 1000), so the origin ends the session cleanly.
        mask = os.urandom(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"\x03\xe8"))
        await conn.send(b"\x88\x82" + mask + payload)
        return Outcome(1, "ok")
    finally:
        await conn.close()


async def malformed(p: Ports) -> Outcome:
    return await _one(p, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", (400,))


Kind = Callable[[Ports], Awaitable[Outcome]]

# name -> (weight, coroutine). Keep-alive carries 10 requests a connection; the long tunnels
# hold a connection for ~1.5 s: their weights keep both frequent without drowning the rest.
KINDS: dict[str, tuple[int, Kind]] = {
    "keepalive": (4, keepalive),
    "tunnel": (4, tunnel),
    "bulk_tunnel": (1, bulk_tunnel),
    "denied": (2, denied),
    "guarded": (1, guarded),
    "dns_failure": (1, dns_failure),
    "flaky": (2, flaky),
    "toggle": (2, toggle),
    "reset_origin": (1, reset_origin),
    "slow_client": (1, slow_client),
    "upgrade": (1, upgrade),
    "malformed": (1, malformed),
}


async def run_kind(kind: Kind, ports: Ports) -> Outcome:
    """Run one exchange; a socket error, timeout or refusal is an outcome, not an exception."""
    try:
        return await kind(ports)
    except StatusError as exc:
        return Outcome(1, f"status_{exc.status}")
    except ConnectionRefusedError as exc:
        return Outcome(0, error_kind(exc))  # never reached the proxy: no record owed
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return Outcome(1, error_kind(exc))


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "closed_early"
    if isinstance(exc, OSError):
        return f"oserror_{exc.errno}"
    return type(exc).__name__
