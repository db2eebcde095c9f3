"""ProxyServer driven in-process: real sockets on 127.0.0.1, real origins, the collaborators of
docs/architecture.md built by `build_proxy`, with a resolver and a dialer the test controls."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy import metrics
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import Action
from tests.support.fixtures import policy_allowing
from tests.support.inprocess import (
    EVENT_TIMEOUT,
    Harness,
    Intercepting,
    closes,
    http_exchange,
    inprocess_proxy,
)
from tests.support.origin import OriginServer

LOOPBACK = (ipaddress.ip_address("127.0.0.1"),)


def get(host: str, port: int, path: str = "/hello") -> bytes:
    return f"GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


@pytest.fixture
async def proxy(tmp_path: Path, origin: OriginServer) -> AsyncIterator[Harness]:
    async with inprocess_proxy(
        tmp_path, policy_allowing("origin.test"), answers={"origin.test": LOOPBACK}
    ) as harness:
        yield harness


async def connect(harness: Harness) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*harness.address)


async def test_a_forwarded_request_leaves_one_decision_and_one_close_record(
    proxy: Harness, origin: OriginServer
) -> None:
    reader, writer = await connect(proxy)
    status, _, body = await http_exchange(reader, writer, get("origin.test", origin.port))
    assert status == 200 and body
    close = (await proxy.audit.wait_for(closes))[0]
    decisions = [r for r in proxy.audit.records if r["event"]["action"] == "decision"]
    assert [d["event"]["id"] for d in decisions] == [close["event"]["id"]]
    assert decisions[0]["outgate"]["decision"] == "allow"
    assert close["outgate"]["reason"] == "completed"
    assert close["destination"]["ip"] == "127.0.0.1"
    writer.close()


async def test_a_dialer_that_refuses_gives_502_and_keeps_the_client_connection(
    proxy: Harness, origin: OriginServer
) -> None:
    reader, writer = await connect(proxy)
    proxy.dialer.fail_next("refused")
    status, headers, _ = await http_exchange(reader, writer, get("origin.test", origin.port))
    assert status == 502 and headers["x-outgate-reason"] == "upstream_refused"
    assert headers["connection"] == "keep-alive"
    proxy.dialer.fail_next("timeout")
    status, headers, _ = await http_exchange(reader, writer, get("origin.test", origin.port))
    assert status == 504 and headers["x-outgate-reason"] == "upstream_timeout"
    # The same connection, the dialer healthy again: the request goes through.
    status, _, _ = await http_exchange(reader, writer, get("origin.test", origin.port))
    assert status == 200
    reasons = [r["outgate"]["reason"] for r in await proxy.audit.wait_for(closes, count=3)]
    assert reasons == ["upstream_refused", "upstream_timeout", "completed"]
    assert [route.permitted for route in proxy.dialer.dialled] == [LOOPBACK] * 3
    writer.close()


async def test_a_kept_upstream_serves_the_next_request_without_a_dial(
    proxy: Harness, origin: OriginServer
) -> None:
    reader, writer = await connect(proxy)
    for _ in range(3):
        status, _, _ = await http_exchange(reader, writer, get("origin.test", origin.port))
        assert status == 200
    assert len(proxy.dialer.dialled) == 1
    writer.close()


async def test_a_denied_name_is_never_resolved_or_dialled(
    proxy: Harness, origin: OriginServer
) -> None:
    reader, writer = await connect(proxy)
    status, headers, body = await http_exchange(reader, writer, get("pastebin.com", 80))
    assert status == 403 and headers["x-outgate-reason"] == "namespace_isolation"
    assert b"workload: tests/Static/client\n" in body
    assert proxy.resolver.asked == [] and proxy.dialer.dialled == []
    writer.close()


async def test_drain_closes_an_idle_kept_alive_connection_at_once(
    proxy: Harness, origin: OriginServer
) -> None:
    reader, writer = await connect(proxy)
    status, _, _ = await http_exchange(reader, writer, get("origin.test", origin.port))
    assert status == 200
    # The drain timeout is 30 s; an idle connection must not hold shutdown for any of it.
    drain = asyncio.create_task(proxy.server.drain(30.0))
    async with asyncio.timeout(EVENT_TIMEOUT):
        assert await reader.read() == b""
        await drain
    writer.close()


async def test_drain_lets_a_busy_request_finish_then_closes_its_connection(
    tmp_path: Path,
) -> None:
    release = asyncio.Event()
    got_request = asyncio.Event()

    async def slow_origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        got_request.set()
        await release.wait()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        await w.drain()
        w.close()

    origin = await asyncio.start_server(slow_origin, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    async with inprocess_proxy(
        tmp_path, policy_allowing("slow.test"), answers={"slow.test": LOOPBACK}
    ) as harness:
        reader, writer = await connect(harness)
        writer.write(get("slow.test", port, "/"))
        await writer.drain()
        async with asyncio.timeout(EVENT_TIMEOUT):
            await got_request.wait()
        drain = asyncio.create_task(harness.server.drain(30.0))
        await asyncio.sleep(0)  # let drain start: it must not cut the request in flight
        assert not drain.done()
        release.set()
        async with asyncio.timeout(EVENT_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(4) == b"slow"
            assert await reader.read() == b""  # then the connection is closed
            await drain
        close = (await harness.audit.wait_for(closes))[0]
        assert close["outgate"]["reason"] == "completed"
        writer.close()
    origin.close()
    await origin.wait_closed()


def _bytes_total(direction: str) -> float:
    value = metrics.REGISTRY.get_sample_value("outgate_bytes_total", {"direction": direction})
    return value or 0.0


async def test_an_intercepted_tunnel_counts_its_bytes_once(intercepting: Intercepting) -> None:
    harness, origin = intercepting.harness, intercepting.origin
    egress, ingress = _bytes_total("egress"), _bytes_total("ingress")
    url = f"https://origin.test:{origin.port}/hello"
    done = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--max-time", "20",
        "-x", f"http://127.0.0.1:{harness.address[1]}", "--cacert", str(intercepting.ca_cert),
        "-o", "/dev/null", "-w", "%{http_code}", url,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    out, err = await done.communicate()
    assert out == b"200", err
    records = await harness.audit.wait_for(closes, count=2)
    tunnel = next(r for r in records if r["outgate"]["connection"] == "tunnel")
    inner = next(r for r in records if r["outgate"]["connection"] == "intercept")
    assert inner["outgate"]["tunnel_id"] == tunnel["event"]["id"]
    assert inner["destination"]["bytes"] > 0
    # The tunnel's wire bytes hold the inner request's: the metric counts them once.
    assert _bytes_total("egress") - egress == tunnel["source"]["bytes"]
    assert _bytes_total("ingress") - ingress == tunnel["destination"]["bytes"]


async def test_a_policy_reload_applies_to_the_next_request_inside_an_intercepted_tunnel(
    intercepting: Intercepting,
) -> None:
    harness = intercepting.harness
    reader, writer = await connect(harness)
    authority = f"origin.test:{intercepting.origin.port}"
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    async with asyncio.timeout(EVENT_TIMEOUT):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        client_tls = ssl.create_default_context(cafile=str(intercepting.ca_cert))
        await writer.start_tls(client_tls, server_hostname="origin.test")
    request = f"GET /hello HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    status, _, _ = await http_exchange(reader, writer, request)
    assert status == 200
    denying = policy_allowing("origin.test").replace("action: Allow", "action: Deny")
    harness.policy.install(
        Engine.compile(
            load_text(denying, file="reloaded.yaml"), default_action=Action.DENY, revision=2
        )
    )
    status, headers, _ = await http_exchange(reader, writer, request)
    assert status == 403 and headers["x-outgate-reason"] == "rule_deny"
    inner = [
        r["outgate"]
        for r in harness.audit.records
        if r["event"]["action"] == "decision" and r["outgate"]["connection"] == "intercept"
    ]
    assert [(o["decision"], o["policy_revision"]) for o in inner] == [("allow", 1), ("deny", 2)]
    writer.close()
