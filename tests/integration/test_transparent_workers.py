"""`workers: 2` with a transparent listener (issue 13): every worker binds it (SO_REUSEPORT on
its fixed port), both serve, and /metrics adds up the transparent connections of both."""

from __future__ import annotations

import socket
from collections.abc import Callable

from tests.integration.test_workers import metric, worker_pids
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, read_response

REQUESTS = 20


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def test_every_worker_serves_the_transparent_http_listener(
    start_proxy: Callable[..., ProxyProcess], dns_server: ScriptedDNSServer, origin: OriginServer
) -> None:
    dns_server.addresses("origin.test", "127.0.0.1")
    port = _free_port()
    proxy = start_proxy(
        policy_allowing("origin.test"),
        nameserver=dns_server.nameserver,
        config={"workers": 2, "transparent": {"http": f"127.0.0.1:{port}"}},
    )
    worker_pids(proxy, 2)  # both workers bound the transparent port too, and said `listening`
    listening = [e for e in proxy.logs if e.get("event") == "listening"]
    assert all(
        e["transparent"] == {f"transparent-http 127.0.0.1:{port}": f"127.0.0.1:{port}"}
        for e in listening
    )
    for _ in range(REQUESTS):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"GET /hello HTTP/1.1\r\nHost: origin.test:{origin.port}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            assert read_response(sock)[0] == 200
    assert len(origin.seen) == REQUESTS
    _, text = proxy.admin("/metrics")
    counted = metric(text, "outgate_transparent_connections_total", listener="transparent-http")
    assert counted == REQUESTS
