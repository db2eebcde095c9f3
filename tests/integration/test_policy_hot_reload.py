"""Hot reload of policy files in a running proxy: new decisions within 2 s, tunnels untouched,
and a broken file leaves the last good policy in force and says so."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, ResponseReader, read_response
from tests.support.waiting import wait_for

StartProxy = Callable[..., ProxyProcess]
RELOAD_DEADLINE = 2.0


def _status(proxy: ProxyProcess, target: str) -> int:
    host = target.split("/")[2]
    with proxy.connect() as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return read_response(sock)[0]


def test_edited_policy_changes_decisions_within_2s_while_a_tunnel_keeps_working(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer, origin: OriginServer
) -> None:
    dns_server.addresses("origin.test", "127.0.0.1")
    dns_server.addresses("other.test", "127.0.0.1")
    # The tunnel carries plain HTTP: `protocol: tcp` (the default, tls, would refuse it).
    proxy = start_proxy(
        policy_allowing("origin.test") + "      protocol: tcp\n", nameserver=dns_server.nameserver
    )
    origin_url = f"http://origin.test:{origin.port}/hello"
    other_url = f"http://other.test:{origin.port}/hello"
    assert _status(proxy, origin_url) == 200
    assert _status(proxy, other_url) == 403

    with proxy.connect() as tunnel:
        tunnel.sendall(f"CONNECT origin.test:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        reader = ResponseReader(tunnel)
        assert reader.next()[0] == 200
        (proxy.policy_dir / "policies.yaml").write_text(policy_allowing("other.test"))
        wait_for(
            lambda: _status(proxy, other_url) == 200,
            timeout=RELOAD_DEADLINE,
            what=f"{other_url} to be answered 200 under the edited policy",
        )
        assert _status(proxy, origin_url) == 403
        # The tunnel decided under the old policy keeps carrying traffic.
        tunnel.sendall(b"GET /hello HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        status, _, body = reader.next()
        assert (status, body) == (200, b"hello from origin\n")
    _, metrics = proxy.admin("/metrics")
    assert "outgate_policy_revision 2.0" in metrics


def test_broken_policy_file_keeps_the_last_good_policy_and_is_reported(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer, origin: OriginServer
) -> None:
    dns_server.addresses("origin.test", "127.0.0.1")
    proxy = start_proxy(policy_allowing("origin.test"), nameserver=dns_server.nameserver)
    origin_url = f"http://origin.test:{origin.port}/hello"
    broken = policy_allowing("origin.test").replace("action: Allow", "action: Alow")
    (proxy.policy_dir / "policies.yaml").write_text(broken)
    failure = proxy.wait_log(lambda e: e.get("event") == "policy_reload_failed", timeout=5)
    assert "policies.yaml" in str(failure)
    assert "spec.rules[0].action" in str(failure)
    assert _status(proxy, origin_url) == 200  # old policy still in force
    status, body = proxy.admin("/readyz")
    assert status == 200  # a last good policy is loaded: keep serving
    assert "spec.rules[0].action" in body
    _, metrics = proxy.admin("/metrics")
    assert "outgate_policy_last_reload_success 0.0" in metrics
    assert 'outgate_policy_reloads_total{result="failure"}' in metrics
    # Fixing the file recovers.
    (proxy.policy_dir / "policies.yaml").write_text(policy_allowing("origin.test", name="fixed"))
    proxy.wait_log(
        lambda e: e.get("event") == "policy_loaded" and e.get("revision") == 2, timeout=5
    )
    _, metrics = proxy.admin("/metrics")
    assert "outgate_policy_last_reload_success 1.0" in metrics
