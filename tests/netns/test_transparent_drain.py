"""SIGTERM with transparent listeners (issue 13): they stop accepting with the proxy listener, an
HTTP connection idle between requests and a TLS connection that has sent nothing are closed at
once, and a busy TLS tunnel is closed at the drain timeout; each TLS connection's records say
`drained` (DESIGN section 7)."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator

import pytest

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.origin import OriginServer
from tests.support.pki import make_pki
from tests.support.proxyproc import ProxyProcess, ResponseReader
from tests.support.transparent import LISTENER, ORIGIN, steered_identity
from tests.tls.hello import real_client_hello

pytestmark = pytest.mark.netns

TLS_PORT, HTTP_PORT = 9443, 9080

POLICIES = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: drain, namespace: tests}
spec:
  podSelector: {}
  rules:
    - name: allowed-api
      action: Allow
      to: [{fqdn: api.allowed.example}]
"""


@pytest.fixture
def draining(
    start_proxy: Callable[..., ProxyProcess],
    dns_server: ScriptedDNSServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    pki = make_pki(tmp_path_factory.mktemp("pki"), ["api.allowed.example"])
    dns_server.addresses("api.allowed.example", ORIGIN, ttl=0)
    with (
        OriginServer(host=ORIGIN, port=443, ssl_context=pki.server_context()),
        OriginServer(host=ORIGIN, port=80),
    ):
        yield start_proxy(
            POLICIES,
            nameserver=dns_server.nameserver,
            config={
                "identity": steered_identity("draining-client"),
                "transparent": {
                    "tls": f"{LISTENER}:{TLS_PORT}",
                    "http": f"{LISTENER}:{HTTP_PORT}",
                },
                "timeouts": {"drain": "4s"},
            },
        )


def _closed(sock: socket.socket, timeout: float) -> bool:
    """The proxy closes the connection within `timeout` (what it still sends is read past)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_sigterm_closes_idle_connections_at_once_and_drains_a_busy_tls_tunnel(
    draining: ProxyProcess,
) -> None:
    proxy = draining
    with (
        socket.create_connection((LISTENER, HTTP_PORT), timeout=10) as idle,
        socket.create_connection((LISTENER, TLS_PORT), timeout=10) as silent,
        socket.create_connection((LISTENER, TLS_PORT), timeout=10) as busy,
    ):
        silent_port = silent.getsockname()[1]
        idle.sendall(b"GET /hello HTTP/1.1\r\nHost: api.allowed.example\r\n\r\n")
        assert ResponseReader(idle).next()[0] == 200
        busy.sendall(real_client_hello("api.allowed.example"))
        assert busy.recv(5)[:1] == b"\x16"  # the origin's ServerHello: the tunnel is spliced
        busy_port = busy.getsockname()[1]
        proxy.signal(signal.SIGTERM)
        proxy.wait_log(lambda e: e.get("event") == "draining")
        assert _closed(idle, timeout=1.5)  # at once, well before the 4s drain
        assert _closed(silent, timeout=2.5)  # after the first-bytes grace
        with pytest.raises(OSError):
            socket.create_connection((LISTENER, TLS_PORT), timeout=2).close()
        assert _closed(busy, timeout=10)
    assert proxy.proc is not None and proxy.proc.wait(10) == 0
    (close,) = proxy.wait_records(
        lambda r: r["source"]["port"] == busy_port and r["event"]["action"] == "close"
    )
    assert close["outgate"]["connection"] == "transparent-tls"
    assert close["outgate"]["reason"] == "drained"
    decision, close = sorted(
        proxy.wait_records(lambda r: r["source"]["port"] == silent_port, 2),
        key=lambda r: r["event"]["action"] != "decision",
    )
    assert decision["outgate"]["reason"] == close["outgate"]["reason"] == "drained"
