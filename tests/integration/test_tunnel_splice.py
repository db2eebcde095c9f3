"""Spliced tunnels (issue 16) in the real proxy process, on its uvloop event loop: bytes
byte-exact through the kernel relay, the metric that says so, and SIGTERM's drain closing a
spliced tunnel with one `drained` close record."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.proxyproc import ProxyProcess, read_until_close
from tests.support.rawserver import RawServer

StartProxy = Callable[..., ProxyProcess]
TCP_POLICY = policy_allowing("raw.test") + "      protocol: tcp\n"
PAYLOAD = 4 << 20


def echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def metric(proxy: ProxyProcess, prefix: str) -> float:
    _, text = proxy.admin("/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def open_tunnel(proxy: ProxyProcess, port: int) -> socket.socket:
    sock = proxy.connect()
    sock.sendall(f"CONNECT raw.test:{port} HTTP/1.1\r\nHost: raw.test:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def echo_through(sock: socket.socket, payload: bytes) -> bytes:
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    got = bytearray()
    while len(got) < len(payload):
        chunk = sock.recv(1 << 16)
        assert chunk, "the tunnel closed early"
        got += chunk
    sender.join()
    return bytes(got)


def test_a_spliced_tunnel_relays_byte_exact_and_sigterm_drains_it_with_one_record(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer
) -> None:
    dns_server.addresses("raw.test", "127.0.0.1")
    proxy = start_proxy(
        TCP_POLICY,
        nameserver=dns_server.nameserver,
        config={"timeouts": {"drain": "1s"}, "limits": {"spliceAfterBytes": 1 << 20}},
    )
    payload = os.urandom(PAYLOAD)
    with RawServer(echo) as raw, open_tunnel(proxy, raw.port) as tunnel:
        assert echo_through(tunnel, payload) == payload
        assert metric(proxy, 'outgate_tunnel_splices_total{outcome="spliced"}') == 1
        assert metric(proxy, "outgate_spliced_tunnels") == 1
        assert echo_through(tunnel, payload[:1000]) == payload[:1000]  # still relayed
        proxy.signal(signal.SIGTERM)
        proxy.wait_log(lambda e: e.get("event") == "draining")
        assert read_until_close(tunnel, timeout=10) == b""  # closed at the drain timeout
    assert proxy.proc is not None and proxy.proc.wait(10) == 0
    closes = proxy.wait_records(lambda r: r["event"]["action"] == "close")
    assert len(closes) == 1
    assert closes[0]["outgate"]["reason"] == "drained"
    assert closes[0]["source"]["bytes"] == closes[0]["destination"]["bytes"] == PAYLOAD + 1000


def test_splice_off_leaves_every_tunnel_on_the_protocol_relay(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer
) -> None:
    dns_server.addresses("raw.test", "127.0.0.1")
    proxy = start_proxy(
        TCP_POLICY,
        nameserver=dns_server.nameserver,
        config={"limits": {"spliceMaxTunnels": 0, "spliceAfterBytes": 0}},
    )
    payload = os.urandom(PAYLOAD)
    with RawServer(echo) as raw, open_tunnel(proxy, raw.port) as tunnel:
        assert echo_through(tunnel, payload) == payload
        tunnel.shutdown(socket.SHUT_WR)
        assert read_until_close(tunnel) == b""
    close = proxy.wait_records(lambda r: r["event"]["action"] == "close")[0]
    assert close["source"]["bytes"] == close["destination"]["bytes"] == PAYLOAD
    assert metric(proxy, "outgate_tunnel_splices_total") == 0
