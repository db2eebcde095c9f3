"""PROXY protocol on the proxy listener, in raw bytes (issue 14, item 10).

The test's socket on 127.0.0.1 plays the load balancer; the client it names (192.0.2.7, a
documentation address) is only ever written inside the header, so nothing leaves loopback. A
real HAProxy in front is tests/integration/test_haproxy_proxy_protocol.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.core.proxy_protocol import V2_SIGNATURE
from tests.support.fixtures import policy_allowing
from tests.support.inprocess import (
    EVENT_TIMEOUT,
    LOOPBACK,
    STATIC_CLIENT,
    Harness,
    closes,
    http_exchange,
    inprocess_proxy,
)
from tests.support.origin import OriginServer

REMOTE = {"name": "build-vm", "namespace": "ci", "cidrs": ["192.0.2.0/24"], "labels": {"app": "ci"}}
# Only the remote client (namespace ci) may reach the origin; the balancer itself (tests/client)
# may not, so an allow proves the header's address was the identity.
POLICY = policy_allowing("origin.test", name="ci", namespace="ci", pod_selector="{}")


def v1(src: str = "192.0.2.7", sport: int = 51000) -> bytes:
    return f"PROXY TCP4 {src} 127.0.0.1 {sport} 3128\r\n".encode()


def v2(command: int = 1, src: str = "192.0.2.7", sport: int = 51000, tlvs: bytes = b"") -> bytes:
    payload = b""
    if command == 1:
        payload = (
            ipaddress.ip_address(src).packed
            + ipaddress.ip_address("127.0.0.1").packed
            + struct.pack("!HH", sport, 3128)
        )
    payload += tlvs
    return V2_SIGNATURE + bytes([0x20 | command, 0x11]) + struct.pack("!H", len(payload)) + payload


def get(port: int) -> bytes:
    return (
        f"GET http://origin.test:{port}/hello HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n".encode()
    )


async def proxy_with(tmp: Path, trusted: list[str], **config: Any) -> Any:
    return inprocess_proxy(
        tmp,
        POLICY,
        answers={"origin.test": LOOPBACK},
        identity={"static": [STATIC_CLIENT, REMOTE]},
        proxyProtocol={"trustedCIDRs": trusted},
        **config,
    )


@pytest.fixture
async def trusted(tmp_path: Path) -> AsyncIterator[Harness]:
    async with await proxy_with(tmp_path, ["127.0.0.1/32"]) as harness:
        yield harness


async def send(harness: Harness, data: bytes, *, close_write: bool = False) -> bytes:
    """Write raw bytes, read until the proxy closes."""
    reader, writer = await asyncio.open_connection(*harness.address)
    writer.write(data)
    if close_write:
        writer.write_eof()
    async with asyncio.timeout(EVENT_TIMEOUT):
        reply = await reader.read()
    writer.close()
    return reply


@pytest.mark.parametrize("header", [v1(), v2(), v2(tlvs=b"\xea\x00\x05\x01vpce")], ids=str)
async def test_a_trusted_balancers_header_names_the_client_and_its_workload(
    trusted: Harness, origin: OriginServer, header: bytes
) -> None:
    reader, writer = await asyncio.open_connection(*trusted.address)
    writer.write(header)
    status, _, body = await http_exchange(reader, writer, get(origin.port))
    assert status == 200 and body
    # Keep-alive: the second request on the connection is the same client (the header is read
    # once, at the start).
    status, _, _ = await http_exchange(reader, writer, get(origin.port))
    assert status == 200
    writer.close()
    await trusted.audit.wait_for(closes, count=2)
    assert len(trusted.audit.records) == 4
    for record in trusted.audit.records:
        assert (record["source"]["ip"], record["source"]["port"]) == ("192.0.2.7", 51000)
        assert record["outgate"]["workload"] == "Static/build-vm"
        assert record["outgate"]["proxy_protocol"]["version"] == (1 if header[0] == 80 else 2)
        assert record["outgate"]["proxy_protocol"]["peer"]["ip"] == "127.0.0.1"
        assert record["outgate"]["proxy_protocol"]["peer"]["port"] > 0


async def test_a_local_command_is_the_balancer_speaking_for_itself(
    trusted: Harness, origin: OriginServer
) -> None:
    reply = await send(
        trusted,
        v2(command=0) + get(origin.port).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
    )
    assert reply.startswith(b"HTTP/1.1 403 ")  # tests/client has no rule to the origin
    (record,) = await trusted.audit.wait_for(closes)
    assert record["source"]["ip"] == "127.0.0.1"
    assert record["outgate"]["workload"] == "Static/client"
    assert record["outgate"]["proxy_protocol"]["peer"]["ip"] == "127.0.0.1"


@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
async def test_an_untrusted_peers_header_is_refused_and_the_peer_stays_the_source(
    tmp_path: Path, origin: OriginServer, header: bytes
) -> None:
    async with await proxy_with(tmp_path, ["10.0.0.0/8"]) as harness:
        reply = await send(harness, header + get(origin.port))
        assert reply.startswith(b"HTTP/1.1 400 ")
        records = await harness.audit.wait_for(lambda r: True, count=2)
        assert [r["event"]["action"] for r in records] == ["decision", "close"]
        for record in records:
            assert record["source"]["ip"] == "127.0.0.1"
            assert record["outgate"]["reason"] == "malformed_request"
            assert "proxy_protocol" not in record["outgate"]
    assert origin.seen == []


@pytest.mark.parametrize(
    ("data", "close_write", "status", "reason"),
    [
        (b"PROXY TCP4 192.0.2.777 127.0.0.1 1 2\r\n", False, 400, "proxy_protocol_invalid"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0c\xc0\x00", True, 400, "proxy_protocol_invalid"),
        (b"PROXY TCP4 192.0.2.7 127.0", True, 400, "proxy_protocol_invalid"),
        (b"GET http://origin.test/ HTTP/1.1\r\n\r\n", False, 400, "proxy_protocol_missing"),
        (b"PROXY TCP4 192.0.2.7", False, 408, "proxy_protocol_timeout"),
        (b"", False, 408, "proxy_protocol_timeout"),
    ],
    ids=["malformed", "truncated-v2", "truncated-v1", "missing", "late", "silent"],
)
async def test_a_bad_header_from_a_trusted_peer_is_answered_closed_and_recorded(
    tmp_path: Path,
    origin: OriginServer,
    data: bytes,
    close_write: bool,
    status: int,
    reason: str,
) -> None:
    async with await proxy_with(
        tmp_path, ["127.0.0.1/32"], timeouts={"header": "300ms"}
    ) as harness:
        reply = await send(harness, data, close_write=close_write)
        assert reply.startswith(f"HTTP/1.1 {status} ".encode())
        assert f"X-Outgate-Reason: {reason}".encode() in reply
        assert b"Connection: close" in reply
        records = await harness.audit.wait_for(lambda r: True, count=2)
        assert [r["event"]["action"] for r in records] == ["decision", "close"]
        assert records[0]["event"]["id"] == records[1]["event"]["id"]
        for record in records:
            assert record["outgate"]["reason"] == reason
            assert record["source"]["ip"] == "127.0.0.1"  # the peer: no client was named
    assert origin.seen == []


async def test_a_health_check_that_connects_and_closes_leaves_no_record(trusted: Harness) -> None:
    # With no byte, with a LOCAL header, with a PROXY header: each closes before any request.
    for probe in (b"", v2(command=0), v1()):
        assert await send(trusted, probe, close_write=True) == b""
    # A request after it is recorded; the health check before it was not.
    reply = await send(trusted, v2(command=0) + b"GET / HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    records = await trusted.audit.wait_for(lambda r: True, count=2)
    assert len(trusted.audit.records) == 2
    assert records[0]["outgate"]["reason"] == "bad_target"


async def test_per_source_limits_count_the_named_clients_not_the_balancer(
    tmp_path: Path, origin: OriginServer
) -> None:
    async with await proxy_with(
        tmp_path, ["127.0.0.1/32"], limits={"maxConnectionsPerSource": 1}
    ) as harness:
        # Two clients behind one balancer: one connection each is within the limit.
        held = []
        for client in ("192.0.2.7", "192.0.2.8"):
            reader, writer = await asyncio.open_connection(*harness.address)
            writer.write(v2(src=client))
            status, _, _ = await http_exchange(reader, writer, get(origin.port))
            assert status == 200
            held.append(writer)
        # A second connection of the same client is over it.
        reply = await send(harness, v2(src="192.0.2.7", sport=51001) + get(origin.port))
        assert reply.startswith(b"HTTP/1.1 429 ")
        for writer in held:
            writer.close()
        refused = await harness.audit.wait_for(
            lambda r: r["outgate"]["reason"] == "connection_limit"
        )
        assert refused[0]["source"] == {"ip": "192.0.2.7", "port": 51001}
