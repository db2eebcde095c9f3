"""Opaque tunnels relayed by splice(2) (issue 16, proxy.dataplane.kernel_splice): the same bytes,
the same counts, the same closes as the Protocol relay, and the Protocol relay whenever splice
cannot be had. Real sockets: an in-process proxy, origins on 127.0.0.1, `protocol: tcp` tunnels
(opaque from their first byte)."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from proxy import metrics
from proxy.dataplane.kernel_splice import SPLICE_AVAILABLE
from proxy.dataplane.peer import IdleDeadlines
from proxy.errors import Reason
from tests.support.fixtures import policy_allowing
from tests.support.inprocess import EVENT_TIMEOUT, LOOPBACK, Harness, closes, inprocess_proxy
from tests.support.pki import make_pki
from tests.support.waiting import eventually

pytestmark = pytest.mark.skipif(not SPLICE_AVAILABLE, reason="splice(2) is Linux only")

POLICY = policy_allowing("raw.test") + "      protocol: tcp\n"
# The relays compared: the Protocol relay only; splice from the first byte; splice after a
# start on the Protocol relay (the switch with bytes in flight).
MODES = {
    "protocol": {"spliceMaxTunnels": 0},
    "splice-at-once": {"spliceAfterBytes": 0},
    "splice-after-256KiB": {"spliceAfterBytes": 256 * 1024},
}
CHUNK = 64 * 1024
PARENT_REPLY = b"HTTP/1.1 200 Connection established\r\n\r\n"

OriginHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def splice_outcomes() -> dict[str, float]:
    outcomes = ("spliced", "budget", "descriptors", "unsupported", "closed")
    return {
        outcome: metrics.REGISTRY.get_sample_value(
            "outgate_tunnel_splices_total", {"outcome": outcome}
        )
        or 0.0
        for outcome in outcomes
    }


def destination_bytes(destination: str) -> dict[str, float]:
    """outgate_destination_bytes_total by direction for one destination label."""
    found = {"egress": 0.0, "ingress": 0.0}
    for family in metrics.REGISTRY.collect():
        if family.name != "outgate_destination_bytes":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["destination"] == destination:
                found[sample.labels["direction"]] += sample.value
    return found


@asynccontextmanager
async def origin_server(handler: OriginHandler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def spliceable_proxy(
    tmp: Path, *, timeouts: dict[str, str] | None = None, **limits: Any
) -> AsyncIterator[Harness]:
    config: dict[str, Any] = {
        "limits": {"newConnectionsPerSecond": 10000, "newConnectionsBurst": 10000, **limits}
    }
    if timeouts is not None:
        config["timeouts"] = timeouts
    async with inprocess_proxy(tmp, POLICY, answers={"raw.test": LOOPBACK}, **config) as harness:
        yield harness


async def open_tunnel(
    harness: Harness, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*harness.address)
    writer.write(f"CONNECT raw.test:{port} HTTP/1.1\r\nHost: raw.test:{port}\r\n\r\n".encode())
    async with asyncio.timeout(EVENT_TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def send_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    for start in range(0, len(data), CHUNK):
        writer.write(data[start : start + CHUNK])
        await writer.drain()


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    async with asyncio.timeout(EVENT_TIMEOUT):
        while chunk := await reader.read(CHUNK):
            chunks.append(chunk)
    return b"".join(chunks)


async def close_record(harness: Harness) -> dict[str, Any]:
    found = await harness.audit.wait_for(closes)
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("mode", MODES)
async def test_bulk_both_ways_arrives_byte_exact_and_is_counted_as_sent(
    tmp_path: Path, mode: str
) -> None:
    upload, download = os.urandom(3 << 20), os.urandom(5 << 20)
    received: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_to_eof(reader))  # the client's half-close arrives
        await send_all(writer, download)
        writer.close()

    before = splice_outcomes()
    async with origin_server(origin) as port, spliceable_proxy(tmp_path, **MODES[mode]) as h:
        reader, writer = await open_tunnel(h, port)
        await send_all(writer, upload)
        writer.write_eof()
        assert await read_to_eof(reader) == download
        assert received == [upload]
        record = await close_record(h)
        writer.close()
    assert record["source"]["bytes"] == len(upload)
    assert record["destination"]["bytes"] == len(download)
    assert record["outgate"]["reason"] == "completed"
    assert destination_bytes(f"raw.test:{port}") == {
        "egress": len(upload),
        "ingress": len(download),
    }
    spliced = splice_outcomes()["spliced"] - before["spliced"]
    assert spliced == (0 if mode == "protocol" else 1)


@pytest.mark.parametrize("mode", MODES)
async def test_the_origin_half_closes_first_and_the_client_still_sends(
    tmp_path: Path, mode: str
) -> None:
    download, upload = os.urandom(2 << 20), os.urandom(1 << 20)
    received: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send_all(writer, download)
        writer.write_eof()  # done sending, still reading
        received.append(await read_to_eof(reader))
        writer.close()

    async with origin_server(origin) as port, spliceable_proxy(tmp_path, **MODES[mode]) as h:
        reader, writer = await open_tunnel(h, port)
        assert await read_to_eof(reader) == download  # EOF, with our own half still open
        await send_all(writer, upload)
        writer.write_eof()
        record = await close_record(h)
        await eventually(lambda: received)  # before the test's end aborts the origin's socket
        writer.close()
    assert received == [upload]
    assert (record["source"]["bytes"], record["destination"]["bytes"]) == (
        len(upload),
        len(download),
    )
    assert record["outgate"]["reason"] == "completed"


@pytest.mark.parametrize("mode", MODES)
async def test_an_origin_reset_mid_transfer_closes_the_client_after_what_was_read(
    tmp_path: Path, mode: str
) -> None:
    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        await send_all(writer, os.urandom(2 << 20))
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST, with whatever the kernel had not sent yet dropped

    async with origin_server(origin) as port, spliceable_proxy(tmp_path, **MODES[mode]) as h:
        reader, writer = await open_tunnel(h, port)
        writer.write(b"hello")
        got = await read_to_eof(reader)  # a clean EOF: the proxy closes after relaying all
        record = await close_record(h)
        writer.close()
    assert 0 < len(got) <= 2 << 20
    assert record["destination"]["bytes"] == len(got)
    assert record["source"]["bytes"] == 5
    assert record["outgate"]["reason"] == "completed"


@pytest.mark.parametrize("mode", ["protocol", "splice-at-once"])
async def test_a_quiet_tunnel_is_closed_at_the_idle_timeout(tmp_path: Path, mode: str) -> None:
    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await read_to_eof(reader)
        writer.close()

    before = splice_outcomes()
    async with (
        origin_server(origin) as port,
        spliceable_proxy(tmp_path, timeouts={"idle": "300ms"}, **MODES[mode]) as h,
    ):
        reader, writer = await open_tunnel(h, port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert await read_to_eof(reader) == b""  # closed by the proxy, not by us
        record = await close_record(h)
        writer.close()
    assert record["outgate"]["reason"] == "idle_timeout"
    assert record["source"]["bytes"] == record["destination"]["bytes"] == 4
    assert splice_outcomes()["spliced"] - before["spliced"] == (mode != "protocol")


async def test_idle_tunnels_share_one_deadline_clock_and_a_chatty_one_outlives_them(
    tmp_path: Path,
) -> None:
    """Twenty quiet tunnels and one that sends a byte every 100 ms, idle timeout 500 ms: the
    quiet ones close at the timeout (the loop's IdleDeadlines, one timer for all), the chatty
    one still echoes after they are gone and closes at the timeout once it stops; then the
    loop holds no deadline."""

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            writer.write(data)
        writer.close()

    loop = asyncio.get_running_loop()
    async with (
        origin_server(origin) as port,
        spliceable_proxy(tmp_path, timeouts={"idle": "500ms"}) as h,
    ):
        quiet = [await open_tunnel(h, port) for _ in range(19)]
        opened = loop.time()  # the last quiet tunnel is quiet from a moment after this
        quiet.append(await open_tunnel(h, port))
        chatty_reader, chatty_writer = await open_tunnel(h, port)

        async def quiet_ones_closed() -> None:
            for reader, _ in quiet:
                assert await read_to_eof(reader) == b""

        closing = asyncio.ensure_future(quiet_ones_closed())
        while not closing.done():
            chatty_writer.write(b"x")
            assert await chatty_reader.readexactly(1) == b"x"
            await asyncio.wait({closing}, timeout=0.1)  # the chatty tunnel's pace
        await closing
        quiet_for = loop.time() - opened
        assert 0.49 <= quiet_for < 5.0  # 10 ms for the two clocks' rounding
        chatty_writer.write(b"still")
        assert await chatty_reader.readexactly(5) == b"still"  # outlived the quiet ones
        assert await read_to_eof(chatty_reader) == b""  # then idles out itself
        records = await h.audit.wait_for(closes, count=21)
        for _, writer in quiet:
            writer.close()
        chatty_writer.close()
    assert {r["outgate"]["reason"] for r in records} == {"idle_timeout"}
    assert loop not in IdleDeadlines._by_loop


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    writer.close()


async def echo_through(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """2 MiB out and back through an echoing origin, byte-exact."""
    payload = os.urandom(2 << 20)
    sending = asyncio.create_task(send_all(writer, payload))
    async with asyncio.timeout(EVENT_TIMEOUT):
        assert await reader.readexactly(len(payload)) == payload
    await sending


async def test_past_the_budget_a_tunnel_stays_on_the_protocol_relay_and_both_work(
    tmp_path: Path,
) -> None:
    before = splice_outcomes()
    async with (
        origin_server(echo) as port,
        spliceable_proxy(tmp_path, spliceMaxTunnels=1, spliceAfterBytes=64 * 1024) as h,
    ):
        first = await open_tunnel(h, port)
        await echo_through(*first)
        second = await open_tunnel(h, port)
        await echo_through(*second)
        after = splice_outcomes()
        assert after["spliced"] - before["spliced"] == 1
        assert after["budget"] - before["budget"] == 1
        await echo_through(*first)  # the spliced one goes on working beside it
        for _, writer in (first, second):
            writer.write_eof()
        records = await h.audit.wait_for(closes, count=2)
    assert sorted(r["source"]["bytes"] for r in records) == [2 << 20, 4 << 20]
    assert all(r["source"]["bytes"] == r["destination"]["bytes"] for r in records)


def lowest_free_descriptor() -> int:
    fd = os.dup(0)
    os.close(fd)
    return fd


async def test_with_no_descriptor_left_the_tunnel_stays_on_the_protocol_relay(
    tmp_path: Path,
) -> None:
    before = splice_outcomes()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with (
        origin_server(echo) as port,
        spliceable_proxy(tmp_path, spliceAfterBytes=64 * 1024) as h,
    ):
        reader, writer = await open_tunnel(h, port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        with capture_logs() as logs:
            # From here no new descriptor can be had in this process: the switch's os.dup fails.
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_descriptor(), hard))
            try:
                writer.write(os.urandom(128 * 1024))
                await eventually(lambda: splice_outcomes()["descriptors"] > before["descriptors"])
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await reader.readexactly(128 * 1024)
        await echo_through(reader, writer)  # still relayed, by the Protocol relay
        writer.write_eof()
        record = await close_record(h)
        writer.close()
    assert splice_outcomes()["spliced"] == before["spliced"]
    fallback = [entry for entry in logs if entry["event"] == "tunnel_splice_fallback"]
    assert [(entry["cause"], entry["event_id"]) for entry in fallback] == [
        ("descriptors", record["event"]["id"])
    ]
    assert (
        record["source"]["bytes"] == record["destination"]["bytes"] == 1 + (128 << 10) + (2 << 20)
    )


async def test_a_tunnel_through_a_parent_reached_over_tls_is_never_spliced(
    tmp_path: Path,
) -> None:
    """The upstream socket carries the parent's TLS records, not the tunnel's bytes: splicing
    it would hand the client ciphertext."""
    pki = make_pki(tmp_path / "parent-pki", ["127.0.0.1"])

    async def tls_parent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(PARENT_REPLY)
        writer.write(await reader.readexactly(2 << 20))  # echoed, then the parent closes
        await writer.drain()
        writer.close()

    before = splice_outcomes()
    server = await asyncio.start_server(tls_parent, "127.0.0.1", 0, ssl=pki.server_context())
    port = server.sockets[0].getsockname()[1]
    parent = {
        "upstreams": [
            {"name": "corp", "proxies": [f"https://127.0.0.1:{port}"], "caBundle": str(pki.ca_pem)}
        ],
        "routes": {"default": "corp"},
    }
    try:
        async with inprocess_proxy(
            tmp_path,
            POLICY,
            answers={"raw.test": LOOPBACK},
            limits={"spliceAfterBytes": 0, "newConnectionsBurst": 10000},
            **parent,
        ) as h:
            reader, writer = await open_tunnel(h, 443)
            await echo_through(reader, writer)
            assert await read_to_eof(reader) == b""
            record = await close_record(h)
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert record["source"]["bytes"] == 2 << 20
    assert record["destination"]["bytes"] == len(PARENT_REPLY) + (2 << 20)  # as ever: wire bytes
    assert splice_outcomes() == before


@pytest.mark.parametrize("mode", ["protocol", "splice-at-once"])
async def test_a_source_that_left_has_its_spliced_tunnel_closed_with_that_reason(
    tmp_path: Path, mode: str
) -> None:
    """A deleted source pod's connections are aborted (ClientConnections.close_from): on a
    spliced tunnel the transport is gone, so the abort must reach the kernel relay."""
    async with origin_server(echo) as port, spliceable_proxy(tmp_path, **MODES[mode]) as h:
        reader, writer = await open_tunnel(h, port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert h.server.close_connections_from(LOOPBACK[0], Reason.SOURCE_GONE) == 1
        assert await read_to_eof(reader) == b""
        record = await close_record(h)
        writer.close()
    assert record["outgate"]["reason"] == "source_gone"
    assert record["source"]["bytes"] == record["destination"]["bytes"] == 4


@pytest.mark.parametrize("mode", MODES)
async def test_a_client_reset_mid_transfer_closes_the_origin_after_what_was_read(
    tmp_path: Path, mode: str
) -> None:
    received: list[bytes] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_to_eof(reader))
        writer.close()

    async with origin_server(sink) as port, spliceable_proxy(tmp_path, **MODES[mode]) as h:
        _, writer = await open_tunnel(h, port)
        await send_all(writer, os.urandom(2 << 20))
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST
        record = await close_record(h)
        await eventually(lambda: received)
    assert 0 < len(received[0]) <= 2 << 20
    assert record["source"]["bytes"] == len(received[0])
    assert record["destination"]["bytes"] == 0
    assert record["outgate"]["reason"] == "completed"
