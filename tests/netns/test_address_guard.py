"""The address guard under attack, with real origins on metadata, private and public-looking
addresses bound inside this test's own network namespace (see tests/netns/enter.sh)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.dnsserver import Records, ScriptedDNSServer
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, ResponseReader, read_response

StartProxy = Callable[..., ProxyProcess]

PUBLIC = "11.0.0.1"
PRIVATE = "10.0.0.5"
METADATA = "169.254.169.254"

POLICIES = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: guard, namespace: tests}
spec:
  podSelector: {}
  rules:
    - name: internal-service
      action: Allow
      to: [{fqdn: internal.corp.test}, {cidr: 10.0.0.0/8}]
      ports: [80]
    - name: guard-names
      action: Allow
      to: [{fqdn: "*.guard.test"}]
      ports: [80]
    - name: any-address
      action: Allow
      to: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}]
      ports: [80, {port: 1024, endPort: 65535}]
"""


@pytest.fixture
def origins() -> Iterator[dict[str, OriginServer]]:
    servers = {
        address: OriginServer(host=address, port=80).start()
        for address in (PUBLIC, PRIVATE, METADATA, "169.254.170.2", "100.64.0.1", "11.0.0.3")
    }
    servers["fd00:ec2::254"] = OriginServer(host="fd00:ec2::254", port=80).start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def proxy(start_proxy: StartProxy, dns_server: ScriptedDNSServer) -> ProxyProcess:
    return start_proxy(
        POLICIES,
        nameserver=dns_server.nameserver,
        config={"guard": {"clusterCIDRs": ["11.0.0.3/32"]}, "timeouts": {"connect": "1s"}},
    )


def _get(proxy: ProxyProcess, target: str) -> tuple[int, dict[str, str], bytes]:
    host = target.split("/")[2]
    with proxy.connect() as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return read_response(sock)


def _nothing_reached(origins: dict[str, OriginServer], *addresses: str) -> None:
    for address in addresses:
        assert origins[address].seen == [], f"a request reached {address}"


def test_name_resolving_to_a_private_address_is_refused(
    proxy: ProxyProcess, dns_server: ScriptedDNSServer, origins: dict[str, OriginServer]
) -> None:
    dns_server.addresses("private.guard.test", PRIVATE)
    status, headers, _ = _get(proxy, "http://private.guard.test/hello")
    assert (status, headers["x-outgate-reason"]) == (403, "guarded_address")
    _nothing_reached(origins, PRIVATE)
    decision, close = proxy.records_by_path("/hello")
    assert decision["outgate"]["decision"] == "deny"
    assert decision["outgate"]["reason"] == "guarded_address"
    assert close["http"]["response"]["status_code"] == 403


def test_private_address_is_allowed_when_the_deciding_rule_lists_its_cidr(
    proxy: ProxyProcess, dns_server: ScriptedDNSServer, origins: dict[str, OriginServer]
) -> None:
    dns_server.addresses("internal.corp.test", PRIVATE)
    status, _, body = _get(proxy, "http://internal.corp.test/hello")
    assert (status, body) == (200, b"hello from origin\n")
    assert origins[PRIVATE].paths_seen() == ["/hello"]


def test_mixed_answers_dial_only_the_public_address(
    proxy: ProxyProcess, dns_server: ScriptedDNSServer, origins: dict[str, OriginServer]
) -> None:
    dns_server.addresses("mixed.guard.test", METADATA, PRIVATE, PUBLIC, "fd00:ec2::254")
    status, _, body = _get(proxy, "http://mixed.guard.test/hello")
    assert (status, body) == (200, b"hello from origin\n")
    assert origins[PUBLIC].paths_seen() == ["/hello"]
    _nothing_reached(origins, METADATA, PRIVATE, "fd00:ec2::254")
    decision, _ = proxy.records_by_path("/hello")
    assert decision["destination"]["ip"] == PUBLIC
    dropped = [e for e in proxy.logs if e.get("event") == "guarded_address_dropped"]
    assert {e["address"] for e in dropped} == {METADATA, PRIVATE, "fd00:ec2::254"}


def test_denied_name_causes_zero_dns_queries(
    proxy: ProxyProcess, dns_server: ScriptedDNSServer
) -> None:
    dns_server.addresses("not-allowed.example", PUBLIC)
    status, headers, _ = _get(proxy, "http://not-allowed.example/")
    assert (status, headers["x-outgate-reason"]) == (403, "namespace_isolation")
    assert dns_server.count("not-allowed.example") == 0
    assert dns_server.queries == []


def test_a_second_answer_pointing_inward_does_not_change_the_address_dialled(
    proxy: ProxyProcess, dns_server: ScriptedDNSServer, origins: dict[str, OriginServer]
) -> None:
    dns_server.answer("rebind.guard.test", "A", Records(PUBLIC, ttl=0), Records(METADATA, ttl=0))
    dns_server.answer("rebind.guard.test", "AAAA")
    status, _, _ = _get(proxy, "http://rebind.guard.test/hello?first")
    assert status == 200
    assert origins[PUBLIC].paths_seen() == ["/hello?first"]
    assert dns_server.count("rebind.guard.test", "A") == 1  # one answer, checked and dialled
    # The next request resolves again (TTL 0), gets the inward answer, and is refused.
    status, headers, _ = _get(proxy, "http://rebind.guard.test/hello?second")
    assert (status, headers["x-outgate-reason"]) == (403, "guarded_address")
    _nothing_reached(origins, METADATA)


GUARDED_LITERALS = [
    ("metadata", "169.254.169.254"),
    ("ecs-metadata", "169.254.170.2"),
    ("v4-mapped-metadata", "[::ffff:169.254.169.254]"),
    ("v4-mapped-hex-metadata", "[::ffff:a9fe:a9fe]"),
    ("nat64-metadata", "[64:ff9b::a9fe:a9fe]"),
    ("6to4-metadata", "[2002:a9fe:a9fe::1]"),
    ("v4-compatible-metadata", "[::a9fe:a9fe]"),
    ("aws-v6-metadata", "[fd00:ec2::254]"),
    ("rfc1918-172", "172.16.5.5"),
    ("rfc1918-192", "192.168.1.10"),
    ("cgnat", "100.64.0.1"),
    ("cluster-cidr", "11.0.0.3"),
    ("loopback", "127.0.0.1"),
    ("v4-mapped-loopback", "[::ffff:127.0.0.1]"),
    ("v6-loopback", "[::1]"),
    ("unspecified", "0.0.0.0"),
]


@pytest.mark.parametrize(
    "host", [h for _, h in GUARDED_LITERALS], ids=[i for i, _ in GUARDED_LITERALS]
)
def test_guarded_ip_literal_is_refused_even_when_a_broad_cidr_rule_allows_it(
    proxy: ProxyProcess, origins: dict[str, OriginServer], host: str
) -> None:
    status, headers, _ = _get(proxy, f"http://{host}/steal")
    assert (status, headers["x-outgate-reason"]) == (403, "guarded_address")
    for server in origins.values():
        assert "/steal" not in server.paths_seen()


def test_public_ip_literal_passes_the_guard(
    proxy: ProxyProcess, origins: dict[str, OriginServer]
) -> None:
    status, _, body = _get(proxy, f"http://{PUBLIC}/hello")
    assert (status, body) == (200, b"hello from origin\n")


def test_the_proxys_own_ports_are_refused_even_when_a_rule_lists_loopback(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer
) -> None:
    loopback_policy = POLICIES.replace("{cidr: 10.0.0.0/8}", "{cidr: 127.0.0.0/8}").replace(
        "ports: [80]\n    - name: guard-names",
        "ports: [{port: 1, endPort: 65535}]\n    - name: guard-names",
    )
    proxy = start_proxy(loopback_policy, nameserver=dns_server.nameserver)
    dns_server.addresses("internal.corp.test", "127.0.0.1")
    for port in (proxy.port, proxy.admin_port):
        status, headers, _ = _get(proxy, f"http://internal.corp.test:{port}/metrics")
        assert (status, headers["x-outgate-reason"]) == (403, "guarded_address"), port
        status, headers, _ = _get(proxy, f"http://127.0.0.1:{port}/metrics")
        assert (status, headers["x-outgate-reason"]) == (403, "guarded_address"), port


def test_three_pipelined_requests_are_each_decided_and_audited(
    proxy: ProxyProcess, dns_server: ScriptedDNSServer, origins: dict[str, OriginServer]
) -> None:
    dns_server.addresses("www.guard.test", PUBLIC)
    dns_server.addresses("denied.example", PUBLIC)
    with proxy.connect() as sock:
        sock.sendall(
            b"GET http://www.guard.test/hello?one HTTP/1.1\r\nHost: www.guard.test\r\n\r\n"
            b"GET http://denied.example/hello?two HTTP/1.1\r\nHost: denied.example\r\n\r\n"
            b"GET http://169.254.169.254/hello?three HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
        )
        reader = ResponseReader(sock)
        responses = [reader.next() for _ in range(3)]
    assert [r[0] for r in responses] == [200, 403, 403]
    assert responses[1][1]["x-outgate-reason"] == "namespace_isolation"
    assert responses[2][1]["x-outgate-reason"] == "guarded_address"
    assert origins[PUBLIC].paths_seen() == ["/hello?one"]
    _nothing_reached(origins, METADATA)
    for path, outcome in (
        ("/hello?one", "allow"),
        ("/hello?two", "deny"),
        ("/hello?three", "deny"),
    ):
        decision, close = proxy.records_by_path(path)
        assert decision["outgate"]["decision"] == outcome
        assert close["event"]["id"] == decision["event"]["id"]
    assert dns_server.count("denied.example") == 0


def test_connect_that_gets_no_answer_times_out_with_504(
    proxy: ProxyProcess, dns_server: ScriptedDNSServer
) -> None:
    # A listener whose accept queue is full drops further SYNs: to the proxy this is exactly an
    # unroutable destination (no answer at all), without needing a real route to nowhere.
    listener = socket.socket()
    listener.bind(("11.0.0.2", 80))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("11.0.0.2", 80))
        fillers.append(filler)
    time.sleep(0.2)
    dns_server.addresses("blackhole.guard.test", "11.0.0.2")
    try:
        started = time.monotonic()
        status, headers, _ = _get(proxy, "http://blackhole.guard.test/")
        assert (status, headers["x-outgate-reason"]) == (504, "upstream_timeout")
        assert time.monotonic() - started < 5
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
