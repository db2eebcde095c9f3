"""WebSocket (and other Upgrade) requests, and plain HTTP inside CONNECT tunnels, with real
clients: python's `websockets` (which tunnels every ws:// URL through CONNECT, as Node's undici
does for http://), aiohttp's WebSocket client (absolute-form through the proxy), and curl
(`-p` tunnels http:// URLs). The origin is a real aiohttp server with a WebSocket endpoint.

Every exchange must leave exactly one decision and one close record under one id.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.clients import curl_async
from tests.support.fixtures import allow_rule, client_policy
from tests.support.inprocess import (
    EVENT_TIMEOUT,
    Harness,
    Intercepting,
    closes,
    inprocess_proxy,
)
from tests.support.origin import WS_GREETING, OriginServer
from tests.support.rawserver import RawServer, read_head

LOOPBACK = (ipaddress.ip_address("127.0.0.1"),)
NAMES = ("origin.test", "http-only.test", "tls-only.test", "inspected.test", "raw.test")


POLICY = client_policy(
    "upgrades",
    allow_rule("no-protocol", "origin.test"),
    allow_rule("raw", "raw.test"),
    allow_rule("http-only", "http-only.test", extra="protocol: http"),
    allow_rule("tls-only", "tls-only.test", extra="protocol: tls"),
    # A rule that must see every request keeps the WebSocket endpoint out of its paths.
    allow_rule("inspected", "inspected.test", extra='protocol: http\ninspect: {paths: ["/hello"]}'),
)


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[Harness]:
    async with inprocess_proxy(tmp_path, POLICY, answers=dict.fromkeys(NAMES, LOOPBACK)) as harness:
        yield harness


def proxy_url(harness: Harness) -> str:
    return f"http://{harness.address[0]}:{harness.address[1]}"


def paired(records: list[dict[str, Any]]) -> bool:
    """Each event id has exactly one decision and one close record."""
    actions = Counter((r["event"]["id"], r["event"]["action"]) for r in records)
    ids = {event_id for event_id, _ in actions}
    return all(actions[(i, "decision")] == 1 and actions[(i, "close")] == 1 for i in ids)


def upgraded(record: dict[str, Any]) -> bool:
    return closes(record) and record["outgate"].get("upgrade") == "websocket"


# --- defect 2: WebSocket over plain forwarding ----------------------------------------------------


async def test_a_websocket_through_plain_forwarding_relays_both_ways_and_is_audited_as_an_upgrade(
    proxy: Harness, origin: OriginServer
) -> None:
    url = f"ws://origin.test:{origin.port}/ws"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, proxy=proxy_url(proxy), autoping=False) as ws,
    ):
        assert await ws.receive_str(timeout=EVENT_TIMEOUT) == WS_GREETING
        await ws.send_str("ping through the proxy")
        assert await ws.receive_str(timeout=EVENT_TIMEOUT) == "ping through the proxy"
        await ws.send_bytes(b"\x00\x01binary\xff")
        assert await ws.receive_bytes(timeout=EVENT_TIMEOUT) == b"\x00\x01binary\xff"
    (close,) = await proxy.audit.wait_for(upgraded)
    assert close["outgate"]["connection"] == "forward"
    assert close["http"]["response"]["status_code"] == 101
    assert close["outgate"]["reason"] == "completed"
    assert close["source"]["bytes"] > 0 and close["destination"]["bytes"] > 0
    assert paired(proxy.audit.records)
    seen = origin.seen[-1]
    assert seen.path == "/ws"
    assert (seen.header("upgrade") or "").lower() == "websocket"
    assert (seen.header("connection") or "").lower() == "upgrade"


# --- defects 1 and 2: a ws:// URL tunnelled through CONNECT ---------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("origin.test", id="rule-without-protocol"),
        pytest.param("http-only.test", id="protocol-http"),
    ],
)
async def test_a_websocket_tunnelled_by_the_websockets_client_is_relayed_after_its_101(
    proxy: Harness, origin: OriginServer, host: str
) -> None:
    url = f"ws://{host}:{origin.port}/ws"
    async with ws_connect(url, proxy=proxy_url(proxy), open_timeout=EVENT_TIMEOUT) as ws:
        assert await ws.recv() == WS_GREETING
        await ws.send("through a tunnel")
        assert await ws.recv() == "through a tunnel"
        await ws.send(b"\x02bytes")
        assert await ws.recv() == b"\x02bytes"
    (inner,) = await proxy.audit.wait_for(upgraded)
    assert inner["outgate"]["connection"] == "tunnel_http"
    assert inner["http"]["response"]["status_code"] == 101
    tunnel_id = inner["outgate"]["tunnel_id"]
    (tunnel,) = await proxy.audit.wait_for(lambda r: closes(r) and r["event"]["id"] == tunnel_id)
    assert tunnel["outgate"]["reason"] == "completed"
    assert paired(proxy.audit.records)


async def test_a_wss_websocket_in_an_intercepted_tunnel_is_relayed_after_its_checked_handshake(
    intercepting: Intercepting,
) -> None:
    harness, origin = intercepting.harness, intercepting.origin
    client_tls = ssl.create_default_context(cafile=str(intercepting.ca_cert))
    url = f"wss://origin.test:{origin.port}/ws"
    # Many TLS records each way, through both TLS terminations (random: deflate cannot shrink it).
    big = os.urandom(200_000)
    async with ws_connect(
        url, proxy=proxy_url(harness), ssl=client_tls, open_timeout=EVENT_TIMEOUT
    ) as ws:
        assert await ws.recv() == WS_GREETING
        await ws.send(big)
        assert await ws.recv() == big
    (inner,) = await harness.audit.wait_for(upgraded)
    assert inner["outgate"]["connection"] == "intercept"
    assert inner["url"]["path"] == "/ws"
    assert inner["source"]["bytes"] > len(big) and inner["destination"]["bytes"] > len(big)
    await harness.audit.wait_for(closes, count=2)
    assert paired(harness.audit.records)


# --- defect 1: plain HTTP in a tunnel -------------------------------------------------------------


async def test_curl_tunnelling_plain_http_gets_the_origins_answer_under_a_rule_without_protocol(
    proxy: Harness, origin: OriginServer
) -> None:
    result = await curl_async(
        "-p", "-x", proxy_url(proxy), f"http://origin.test:{origin.port}/hello"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from origin\n"
    records = await proxy.audit.wait_for(closes, count=2)
    kinds = {r["outgate"]["connection"]: r for r in records}
    assert kinds["tunnel_http"]["url"]["path"] == "/hello"
    assert kinds["tunnel_http"]["http"]["response"]["status_code"] == 200
    assert kinds["tunnel"]["outgate"]["reason"] == "completed"
    assert paired(proxy.audit.records)


async def test_plain_http_in_a_tunnel_whose_rule_requires_tls_is_answered_403_with_the_reason(
    proxy: Harness, origin: OriginServer
) -> None:
    result = await curl_async(
        "-p", "-x", proxy_url(proxy), "-i", f"http://tls-only.test:{origin.port}/hello"
    )
    # Before: curl: (52) Empty reply from server. Now curl shows the CONNECT's 200, then the
    # answer to the request inside the tunnel, which names the reason and the fix.
    assert result.returncode == 0, result.stderr
    connect_head, inner_head, body = result.stdout.split("\r\n\r\n", 2)
    assert connect_head.startswith("HTTP/1.1 200 ")
    assert inner_head.startswith("HTTP/1.1 403 ")
    assert "\r\nX-Outgate-Reason: protocol_mismatch" in inner_head
    assert "reason: protocol_mismatch" in body
    assert "requires protocol tls" in body
    (close,) = await proxy.audit.wait_for(closes)
    assert close["outgate"]["connection"] == "tunnel"
    assert close["outgate"]["reason"] == "protocol_mismatch"
    assert close["destination"]["bytes"] == 0
    assert f"event id: {close['event']['id']}" in body
    assert paired(proxy.audit.records)
    assert origin.seen == []  # nothing reached the origin


async def test_plain_http_in_a_tunnel_an_inspect_rule_without_protocol_intercepts_gets_403(
    intercepting: Intercepting,
) -> None:
    harness, origin = intercepting.harness, intercepting.origin
    result = await curl_async(
        "-p", "-x", proxy_url(harness), "-i", f"http://origin.test:{origin.port}/hello"
    )
    assert result.returncode == 0, result.stderr
    _, inner_head, body = result.stdout.split("\r\n\r\n", 2)
    assert inner_head.startswith("HTTP/1.1 403 ")
    assert "\r\nX-Outgate-Reason: protocol_mismatch" in inner_head
    assert "requires protocol tls" in body
    (close,) = await harness.audit.wait_for(closes)
    assert close["outgate"]["reason"] == "protocol_mismatch"
    assert paired(harness.audit.records)
    assert origin.seen == []


async def test_a_request_inside_a_tunnel_that_the_rule_refuses_is_answered_403_inside_it(
    proxy: Harness, origin: OriginServer
) -> None:
    result = await curl_async(
        "-p",
        "-x",
        proxy_url(proxy),
        "-o",
        "/dev/null",
        "-D",
        "-",
        f"http://inspected.test:{origin.port}/headers",
    )
    assert result.returncode == 0, result.stderr
    assert "HTTP/1.1 403 " in result.stdout
    assert "X-Outgate-Reason: path_not_allowed" in result.stdout
    records = await proxy.audit.wait_for(closes, count=2)
    reasons = {r["outgate"]["connection"]: r["outgate"]["reason"] for r in records}
    assert reasons == {"tunnel_http": "path_not_allowed", "tunnel": "completed"}
    assert paired(proxy.audit.records)
    assert origin.seen == []


async def test_a_rule_whose_paths_exclude_the_websocket_endpoint_refuses_it_on_plain_forwarding(
    proxy: Harness, origin: OriginServer
) -> None:
    url = f"ws://inspected.test:{origin.port}/ws"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, proxy=proxy_url(proxy))
    assert refused.value.status == 403
    assert refused.value.headers is not None
    assert refused.value.headers["X-Outgate-Reason"] == "path_not_allowed"
    (close,) = await proxy.audit.wait_for(closes)
    decision = next(r for r in proxy.audit.records if r["event"]["action"] == "decision")
    assert decision["outgate"]["decision"] == "deny"
    assert decision["outgate"]["reason"] == "path_not_allowed"
    assert decision["rule"]["name"] == "inspected"
    assert close["outgate"]["reason"] == "path_not_allowed"
    assert paired(proxy.audit.records)
    assert origin.seen == []


async def test_a_rule_whose_paths_exclude_the_websocket_endpoint_refuses_it_in_a_tunnel(
    proxy: Harness, origin: OriginServer
) -> None:
    url = f"ws://inspected.test:{origin.port}/ws"
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(url, proxy=proxy_url(proxy), open_timeout=EVENT_TIMEOUT):
            pass
    assert refused.value.response.status_code == 403
    assert refused.value.response.headers["X-Outgate-Reason"] == "path_not_allowed"
    (inner,) = await proxy.audit.wait_for(
        lambda r: closes(r) and r["outgate"]["connection"] == "tunnel_http"
    )
    assert inner["outgate"]["reason"] == "path_not_allowed"
    assert "upgrade" not in inner["outgate"]
    assert origin.seen == []


# --- upgrade safety -------------------------------------------------------------------------------


def raw_request(harness: Harness, request: bytes) -> bytes:
    """Send `request` on a fresh connection and read until the proxy closes it."""
    with socket.create_connection(harness.address, timeout=EVENT_TIMEOUT) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


async def test_an_h2c_upgrade_is_never_offered_upstream_and_the_request_is_served_as_http11(
    proxy: Harness, origin: OriginServer
) -> None:
    request = (
        f"GET http://origin.test:{origin.port}/headers HTTP/1.1\r\n"
        f"Host: origin.test:{origin.port}\r\n"
        "Connection: Upgrade, HTTP2-Settings, close\r\n"
        "Upgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
        "\r\n"
    ).encode()
    reply = await asyncio.to_thread(raw_request, proxy, request)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    seen = {name.lower() for name, _ in json.loads(body)}
    assert not seen & {"upgrade", "http2-settings", "connection"}
    (close,) = await proxy.audit.wait_for(closes)
    assert "upgrade" not in close["outgate"]
    assert paired(proxy.audit.records)


async def test_curl_http2_prior_upgrade_through_the_proxy_still_gets_its_answer(
    proxy: Harness, origin: OriginServer
) -> None:
    result = await curl_async(
        "--http2", "-x", proxy_url(proxy), f"http://origin.test:{origin.port}/hello"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from origin\n"
    assert origin.seen[-1].header("upgrade") is None


def switch_anyway(conn: socket.socket) -> None:
    """An origin that answers every request `101` to h2c, and then talks on."""
    read_head(conn)
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    )


@pytest.mark.parametrize(
    "upgrade_lines",
    [
        pytest.param("", id="no-upgrade-asked"),
        pytest.param("Connection: upgrade\r\nUpgrade: websocket\r\n", id="another-protocol"),
        pytest.param("Connection: upgrade\r\nUpgrade: h2c\r\n", id="h2c-not-offered"),
    ],
)
async def test_a_101_to_a_protocol_that_was_not_offered_is_a_502(
    proxy: Harness, upgrade_lines: str
) -> None:
    with RawServer(switch_anyway) as upstream:
        request = (
            f"GET http://raw.test:{upstream.port}/ HTTP/1.1\r\nHost: raw.test:{upstream.port}\r\n"
            f"{upgrade_lines}\r\n"
        ).encode()
        reply = await asyncio.to_thread(raw_request, proxy, request)
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert b"X-Outgate-Reason: upstream_bad_response" in reply
    assert b"\x00\x00\x00\x04" not in reply  # nothing of the other protocol reached the client
    (close,) = await proxy.audit.wait_for(closes)
    assert close["outgate"]["reason"] == "upstream_bad_response"
    assert paired(proxy.audit.records)


async def test_an_upgrade_request_with_a_body_is_forwarded_without_its_upgrade(
    proxy: Harness, origin: OriginServer
) -> None:
    request = (
        f"POST http://origin.test:{origin.port}/echo HTTP/1.1\r\n"
        f"Host: origin.test:{origin.port}\r\n"
        "Connection: upgrade, close\r\nUpgrade: websocket\r\n"
        "Content-Length: 5\r\n\r\nhello"
    ).encode()
    reply = await asyncio.to_thread(raw_request, proxy, request)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello"
    seen = origin.seen[-1]
    assert seen.header("upgrade") is None and seen.body_bytes == 5


# --- idle timeout ---------------------------------------------------------------------------------


@pytest.fixture
async def quick_idle_proxy(tmp_path: Path) -> AsyncIterator[Harness]:
    async with inprocess_proxy(
        tmp_path,
        POLICY,
        answers=dict.fromkeys(NAMES, LOOPBACK),
        timeouts={"idle": "1s"},
    ) as harness:
        yield harness


@pytest.mark.parametrize("path", ["forward", "tunnel"])
async def test_an_upgraded_connection_is_closed_at_the_idle_timeout(
    quick_idle_proxy: Harness, origin: OriginServer, path: str
) -> None:
    proxy = quick_idle_proxy
    url = f"ws://origin.test:{origin.port}/ws"
    if path == "tunnel":
        async with ws_connect(
            url, proxy=proxy_url(proxy), open_timeout=EVENT_TIMEOUT, ping_interval=None
        ) as ws:
            assert await ws.recv() == WS_GREETING
            # Neither side sends again: the proxy cuts the relay at the idle timeout.
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(EVENT_TIMEOUT):
                    await ws.recv()
    else:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, proxy=proxy_url(proxy), autoping=False) as ws,
        ):
            assert await ws.receive_str(timeout=EVENT_TIMEOUT) == WS_GREETING
            message = await ws.receive(timeout=EVENT_TIMEOUT)
            assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE)
    (close,) = await proxy.audit.wait_for(upgraded)
    assert close["outgate"]["reason"] == "idle_timeout"
    assert 0.9e9 < close["event"]["duration"] < EVENT_TIMEOUT * 1e9
    if path == "tunnel":
        await proxy.audit.wait_for(closes, count=2)
    assert paired(proxy.audit.records)
