"""Upstream (parent) proxies, driven in-process with scripted parents (issue 12).

Every name resolves to 127.0.0.1 (which the test policy's cidr lets through the guard): a
routing bug that dialled directly would reach only this machine's loopback.

Each parent here is a RawServer that speaks just enough of a proxy to show one behaviour: how it
answers CONNECT, what reaches it and when, how many connections it gets. The real parent, Squid,
is in tests/netns/test_upstream_squid.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import metrics
from tests.support.fixtures import policy_allowing
from tests.support.inprocess import EVENT_TIMEOUT, Harness, closes, http_exchange, inprocess_proxy
from tests.support.origin import OriginServer
from tests.support.rawserver import RawServer, read_head
from tests.support.tools import free_port
from tests.tls.hello import hello_record

LOOPBACK = (ipaddress.ip_address("127.0.0.1"),)
NAME = "api.example.test"
PASSWORD = "s3cret-parent-pw"
FAILURES = "outgate_upstream_proxy_connect_failures_total"


def parent_config(*ports: int, **options: Any) -> dict[str, Any]:
    return {
        "upstreams": [
            {
                "name": "corp",
                "proxies": [f"http://127.0.0.1:{port}" for port in ports],
                "connectTimeout": "2s",
                "responseTimeout": "1s",
                **options,
            }
        ],
        "routes": {"default": "corp"},
    }


def via_parent(tmp_path: Path, config: dict[str, Any], *names: str) -> Any:
    """An in-process proxy allowing `names` (api.example.test by default), each resolving to
    127.0.0.1, with the upstreams and routes of `config`."""
    names = names or (NAME,)
    return inprocess_proxy(
        tmp_path,
        policy_allowing(*names),
        answers=dict.fromkeys(names, LOOPBACK),
        **config,
    )


def answer_connect(status: bytes, received: list[bytes]) -> Callable[[socket.socket], None]:
    """A parent that answers CONNECT with `status`, then records whatever else arrives."""

    def handle(conn: socket.socket) -> None:
        received.append(read_head(conn))
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        conn.settimeout(1.0)
        try:
            while chunk := conn.recv(65536):
                received.append(chunk)
        except TimeoutError:
            pass

    return handle


def serve_forward(
    seen: list[bytes], body: bytes = b"via parent"
) -> Callable[[socket.socket], None]:
    """A parent that answers every plain-HTTP request on the connection, keeping it alive."""

    def handle(conn: socket.socket) -> None:
        conn.settimeout(2.0)
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    return
                if not chunk:
                    return
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            seen.append(head)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return handle


async def raw_connect(harness: Harness, data: bytes) -> bytes:
    """Send `data` on a new connection and read until the proxy closes it."""
    reader, writer = await asyncio.open_connection(*harness.address)
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(EVENT_TIMEOUT):
        reply = await reader.read()
    writer.close()
    return reply


async def one_close(harness: Harness, **expected: Any) -> dict[str, Any]:
    def match(record: dict[str, Any]) -> bool:
        return closes(record) and all(
            record["destination"].get(k) == v for k, v in expected.items()
        )

    return (await harness.audit.wait_for(match))[0]


@pytest.mark.parametrize("status", [b"403 Forbidden", b"407 Proxy Authentication Required"])
async def test_a_parent_refusing_connect_gives_502_and_no_client_byte_reaches_it(
    tmp_path: Path, status: bytes
) -> None:
    received: list[bytes] = []
    with RawServer(answer_connect(status, received)) as parent:
        async with via_parent(tmp_path, parent_config(parent.port)) as proxy:
            # The ClientHello follows the CONNECT at once, before any answer: it must wait.
            request = b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n"
            reply = await raw_connect(proxy, request + hello_record(sni=b"api.example.test"))
            close = await one_close(proxy, domain="api.example.test")
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert b"upstream_proxy_refused" in reply
    assert received[0].startswith(b"CONNECT api.example.test:443 HTTP/1.1\r\n")
    assert received[1:] == [], "client bytes reached the parent before its 200"
    assert close["outgate"]["reason"] == "upstream_proxy_refused"
    assert close["outgate"]["upstream"] == {
        "name": "corp",
        "proxy": f"127.0.0.1:{parent.port}",
        "resolve": "local",
        "status": int(status[:3]),
    }


async def test_an_sni_mismatch_through_a_parent_closes_before_the_hello_is_sent_on(
    tmp_path: Path,
) -> None:
    received: list[bytes] = []
    with RawServer(answer_connect(b"200 Connection established", received)) as parent:
        async with via_parent(tmp_path, parent_config(parent.port)) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(EVENT_TIMEOUT):
                established = await reader.readuntil(b"\r\n\r\n")
                writer.write(hello_record(sni=b"other.example.test"))
                rest = await reader.read()
            writer.close()
            close = await one_close(proxy, domain="api.example.test")
    assert established.startswith(b"HTTP/1.1 200")
    assert rest == b""
    assert close["outgate"]["reason"] == "sni_mismatch"
    assert received[1:] == [], "the ClientHello was sent on to the parent"


async def test_tunnel_and_plain_http_via_a_parent_send_its_credentials_never_the_clients(
    tmp_path: Path,
) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(f"outgate:{PASSWORD}\n")
    expected = b"Proxy-Authorization: Basic " + base64.b64encode(f"outgate:{PASSWORD}".encode())
    tunnel_seen: list[bytes] = []
    forward_seen: list[bytes] = []
    with (
        RawServer(answer_connect(b"200 Connection established", tunnel_seen)) as tunnel_parent,
        RawServer(serve_forward(forward_seen)) as forward_parent,
    ):
        config = parent_config(tunnel_parent.port, credentialsFile=str(credentials))
        config["upstreams"].append(
            {
                "name": "plain",
                "proxies": [f"http://127.0.0.1:{forward_parent.port}"],
                "credentialsFile": str(credentials),
            }
        )
        config["routes"]["rules"] = [{"to": [{"fqdn": "plain.example.test"}], "via": "plain"}]
        async with via_parent(tmp_path, config, NAME, "plain.example.test") as proxy:
            client_auth = b"Proxy-Authorization: Basic Y2xpZW50OmNsaWVudC1wdw==\r\n"
            reader, writer = await asyncio.open_connection(*proxy.address)
            status, _, body = await http_exchange(
                reader,
                writer,
                b"GET http://plain.example.test/x?q=1 HTTP/1.1\r\nHost: plain.example.test\r\n"
                + client_auth
                + b"\r\n",
            )
            writer.close()
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(
                b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: x\r\n" + client_auth + b"\r\n"
            )
            async with asyncio.timeout(EVENT_TIMEOUT):
                established = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            forward_close = await one_close(proxy, domain="plain.example.test")
    assert (status, body) == (200, b"via parent")
    assert forward_seen[0].startswith(b"GET http://plain.example.test/x?q=1 HTTP/1.1\r\n")
    assert expected in forward_seen[0]
    assert established.startswith(b"HTTP/1.1 200")
    assert expected in tunnel_seen[0]
    for head in (forward_seen[0], tunnel_seen[0]):
        assert b"Y2xpZW50OmNsaWVudC1wdw==" not in head, "the client's credentials were sent on"
    assert forward_close["outgate"]["upstream"]["name"] == "plain"
    assert forward_close["destination"]["ip"] is None  # the parent chose the address


async def test_a_kept_connection_to_the_parent_serves_the_next_client_too(tmp_path: Path) -> None:
    seen: list[bytes] = []
    with RawServer(serve_forward(seen)) as parent:
        async with via_parent(tmp_path, parent_config(parent.port)) as proxy:
            for path in (b"/first", b"/second"):
                reader, writer = await asyncio.open_connection(*proxy.address)
                status, _, _ = await http_exchange(
                    reader,
                    writer,
                    b"GET http://api.example.test" + path + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                )
                assert status == 200
                writer.close()
                await writer.wait_closed()
    assert [head.split(b" ")[1] for head in seen] == [
        b"http://api.example.test/first",
        b"http://api.example.test/second",
    ]
    assert parent.connections == 1


async def test_a_parent_that_does_not_answer_connect_in_time_gives_504(tmp_path: Path) -> None:
    def silent(conn: socket.socket) -> None:
        read_head(conn)
        conn.settimeout(3.0)
        with contextlib.suppress(TimeoutError):
            conn.recv(1)

    with RawServer(silent) as parent:
        async with via_parent(
            tmp_path, parent_config(parent.port, responseTimeout="300ms")
        ) as proxy:
            reply = await raw_connect(proxy, b"CONNECT api.example.test:443 HTTP/1.1\r\n\r\n")
            close = await one_close(proxy, domain="api.example.test")
    assert reply.startswith(b"HTTP/1.1 504 ")
    assert close["outgate"]["reason"] == "upstream_proxy_timeout"


async def test_a_refusing_parent_is_skipped_while_down_and_retried_after_retry_after(
    tmp_path: Path,
) -> None:
    first = free_port()
    first_label = f"127.0.0.1:{first}"
    second_seen: list[bytes] = []
    labels = {"upstream": "corp", "proxy": first_label}

    def failures() -> float:
        return metrics.REGISTRY.get_sample_value(FAILURES, labels) or 0.0

    def up() -> float | None:
        return metrics.REGISTRY.get_sample_value("outgate_upstream_proxy_up", labels)

    before = failures()
    with RawServer(serve_forward(second_seen, body=b"second")) as second:
        async with via_parent(
            tmp_path, parent_config(first, second.port, failLimit=2, retryAfter="1s")
        ) as proxy:

            async def get(path: str) -> bytes:
                reader, writer = await asyncio.open_connection(*proxy.address)
                request = f"GET http://api.example.test{path} HTTP/1.1\r\nHost: x\r\n"
                # Connection: close: each request dials, so each one consults the health state.
                status, _, body = await http_exchange(
                    reader, writer, request.encode() + b"Connection: close\r\n\r\n"
                )
                writer.close()
                assert status == 200
                return body

            assert [await get(f"/{n}") for n in range(5)] == [b"second"] * 5
            # Two refusals marked it down; the three requests after did not try it.
            assert failures() - before == 2
            assert up() == 0
            first_seen: list[bytes] = []
            with RawServer(serve_forward(first_seen, body=b"first"), port=first):
                # Polled: the event awaited is retryAfter passing; until then "second" answers.
                body = b""
                async with asyncio.timeout(EVENT_TIMEOUT):
                    while body != b"first":
                        await asyncio.sleep(0.05)
                        body = await get("/again")
            assert up() == 1
            assert first_seen
            close = (await proxy.audit.wait_for(closes, count=6))[-1]
    assert close["outgate"]["upstream"]["proxy"] == first_label


async def test_resolve_parent_asks_no_local_dns_and_still_refuses_guarded_literals(
    tmp_path: Path,
) -> None:
    seen: list[bytes] = []
    with RawServer(serve_forward(seen)) as parent:
        async with inprocess_proxy(
            tmp_path,
            # 0.0.0.0/0 allows any literal by policy, but opens no guarded block.
            policy_allowing("intranet.corp.test", cidrs=("0.0.0.0/0",)),
            **parent_config(parent.port, resolve="parent"),
        ) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            status, _, body = await http_exchange(
                reader, writer, b"GET http://intranet.corp.test/ HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            writer.close()
            decision = (
                await proxy.audit.wait_for(
                    lambda r: (
                        r["event"]["action"] == "decision"
                        and r["destination"]["domain"] == "intranet.corp.test"
                    )
                )
            )[0]
            reply = await raw_connect(
                proxy,
                b"GET http://169.254.169.254/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
    assert (status, body) == (200, b"via parent")
    assert proxy.resolver.asked == []
    assert decision["outgate"]["upstream"] == {"name": "corp", "resolve": "parent"}
    assert reply.startswith(b"HTTP/1.1 403 ")
    assert b"guarded_address" in reply
    assert len(seen) == 1


async def test_a_direct_route_bypasses_the_parent(tmp_path: Path, origin: OriginServer) -> None:
    seen: list[bytes] = []
    with RawServer(serve_forward(seen)) as parent:
        config = parent_config(parent.port)
        config["routes"]["rules"] = [{"to": [{"cidr": "127.0.0.0/8"}], "via": "direct"}]
        async with via_parent(tmp_path, config, "origin.test") as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            status, _, _ = await http_exchange(
                reader,
                writer,
                f"GET http://origin.test:{origin.port}/hello HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            )
            writer.close()
            close = await one_close(proxy, domain="origin.test")
    assert status == 200
    assert origin.paths_seen() == ["/hello"]
    assert seen == []
    assert close["outgate"]["upstream"] == {"name": "direct"}
    assert close["destination"]["ip"] == "127.0.0.1"
