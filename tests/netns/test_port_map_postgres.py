"""Fixed TCP port maps (issue 13): a workload that speaks Postgres to a port of the proxy reaches
one fixed destination, decided for that workload, and only when its bytes are Postgres
(the rule's `protocol: postgres`). A real PostgreSQL server and a real `psql`."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.postgres import PostgresServer
from tests.support.proxyproc import ProxyProcess
from tests.support.transparent import LISTENER, ORIGIN, steered_identity
from tests.tls.hello import hello_record

pytestmark = pytest.mark.netns

DATABASE = ORIGIN  # ledger.db.corp.example's real address, in this namespace
MAPPED_PORT = 15432
DENIED_PORT = 15433

POLICIES = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: ledger, namespace: tests}
spec:
  podSelector: {}
  rules:
    - name: ledger-db
      action: Allow
      to: [{fqdn: ledger.db.corp.example}]
      ports: [5432]
      protocol: postgres
"""


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with (
        ScriptedDNSServer() as dns,
        PostgresServer(host=DATABASE, port=5432),
    ):
        dns.addresses("ledger.db.corp.example", DATABASE, ttl=0)
        dns.addresses("other.db.corp.example", DATABASE, ttl=0)
        with ProxyProcess(
            tmp_path_factory.mktemp("port-map"),
            policies=POLICIES,
            nameserver=dns.nameserver,
            config={
                "identity": steered_identity("ledger-client"),
                "transparent": {
                    "ports": [
                        {
                            "listen": f"{LISTENER}:{MAPPED_PORT}",
                            "to": "ledger.db.corp.example:5432",
                        },
                        {"listen": f"{LISTENER}:{DENIED_PORT}", "to": "other.db.corp.example:5432"},
                    ]
                },
                "timeouts": {"sniPeek": "2s"},
            },
        ) as proxy:
            yield proxy


def _psql(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-h", LISTENER, "-p", str(port), "-U", "postgres", "-d", "postgres",
         "-X", "-A", "-t", "-c", "select 40 + 2"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "10"},
        check=False,
    )  # fmt: skip


def _records(proxy: ProxyProcess, pred: Any) -> list[dict[str, Any]]:
    found = proxy.wait_records(pred, 2)
    return sorted(found, key=lambda r: r["event"]["action"] != "decision")


def test_real_psql_through_the_port_map_reaches_the_fixed_destination(
    mapped: ProxyProcess,
) -> None:
    result = _psql(MAPPED_PORT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"
    decision, close = _records(
        mapped,
        lambda r: (
            r["outgate"]["connection"] == "port-map"
            and r["outgate"].get("reason") in ("completed", "allow", "rule_allow")
        ),
    )
    assert decision["outgate"]["decision"] == "allow"
    assert decision["rule"]["name"] == "ledger-db"
    assert decision["destination"]["domain"] == "ledger.db.corp.example"
    assert decision["destination"]["port"] == 5432
    assert close["outgate"]["reason"] == "completed"
    assert close["destination"]["ip"] == DATABASE
    assert close["source"]["bytes"] > 0 and close["destination"]["bytes"] > 0


def test_port_map_to_a_destination_the_workload_may_not_reach_is_closed(
    mapped: ProxyProcess,
) -> None:
    result = _psql(DENIED_PORT)
    assert result.returncode != 0
    decision, close = _records(
        mapped,
        lambda r: (
            r["outgate"]["connection"] == "port-map"
            and r["destination"]["domain"] == "other.db.corp.example"
        ),
    )
    assert decision["outgate"]["decision"] == "deny"
    assert decision["outgate"]["reason"] == "namespace_isolation"
    assert close["event"]["id"] == decision["event"]["id"]


def _refused(first_bytes: bytes) -> tuple[int, bytes]:
    """Send `first_bytes` to the mapped port; (client port, all the proxy sent until it closed)."""
    with socket.create_connection((LISTENER, MAPPED_PORT), timeout=10) as sock:
        port = sock.getsockname()[1]
        sock.sendall(first_bytes)
        sock.settimeout(10)
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    return port, answer


def _refusal_records(mapped: ProxyProcess, port: int, first_bytes: bytes) -> None:
    decision, close = _records(mapped, lambda r: r["source"]["port"] == port)
    assert decision["outgate"]["decision"] == "allow"  # the destination is allowed...
    assert close["outgate"]["reason"] == "protocol_mismatch"  # ...these bytes are not
    assert close["outgate"]["protocol"]["first_bytes"] == first_bytes[:16].hex()
    assert close["destination"]["bytes"] == 0  # nothing relayed either way


def test_tls_sent_to_a_postgres_port_map_is_closed(mapped: ProxyProcess) -> None:
    hello = hello_record(b"ledger.db.corp.example")
    port, answer = _refused(hello)
    assert answer == b""
    _refusal_records(mapped, port, hello)


def test_http_sent_to_a_postgres_port_map_is_answered_403_and_closed(
    mapped: ProxyProcess,
) -> None:
    request = b"GET / HTTP/1.1\r\nHost: ledger\r\n\r\n"
    port, answer = _refused(request)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"X-Outgate-Reason: protocol_mismatch" in answer
    _refusal_records(mapped, port, request)
