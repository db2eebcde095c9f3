"""The hostile-input harness: one proxy, an allowed origin on loopback, and forbidden origins
on the metadata, private and public-looking addresses bound inside this test's namespace.

Every test here sends raw bytes and asserts the status, whether the connection closed, the
audit reason, and that nothing reached a destination it must not reach.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess

METADATA = "169.254.169.254"
PRIVATE = "10.0.0.5"
PUBLIC = "11.0.0.1"
ADMIN_SOURCE = "10.9.9.9"  # a static identity with wide rights; attackers claim to be it

POLICIES = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: client, namespace: tests}
spec:
  podSelector: {matchLabels: {app: client}}
  rules:
    - name: loopback-origin
      action: Allow
      to: [{fqdn: origin.test}, {cidr: 127.0.0.0/8}]
      ports: [{port: 1024, endPort: 65535}]
      protocol: tcp
    - name: public-names
      action: Allow
      to: [{fqdn: "*.public.test"}]
      ports: [80]
      protocol: tcp
    - name: any-public-address
      action: Allow
      to: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}]
      ports: [80]
      protocol: tcp
---
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: admin, namespace: ops}
spec:
  podSelector: {}
  rules:
    - name: admin-only
      action: Allow
      to: [{fqdn: "*.admin-only.test"}, {cidr: 127.0.0.0/8}]
      ports: [{port: 1024, endPort: 65535}]
"""


@dataclass
class Attack:
    """What the proxy answered to raw bytes, and whether it closed the connection."""

    data: bytes
    closed: bool
    port: int  # the client's source port: audit records of this attack carry it

    @property
    def status(self) -> int | None:
        if not self.data.startswith(b"HTTP/1.1 "):
            return None
        return int(self.data[9:12])

    def header(self, name: str) -> str | None:
        head = self.data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


@dataclass
class Range:
    proxy: ProxyProcess
    dns: ScriptedDNSServer
    origin: OriginServer  # the allowed loopback origin, reached as origin.test:PORT
    public: OriginServer  # 11.0.0.1:80, public-looking: reachable by policy
    forbidden: dict[str, OriginServer]  # metadata and private addresses: never reachable

    @property
    def origin_authority(self) -> str:
        return f"origin.test:{self.origin.port}"

    def reset(self) -> None:
        self.dns.clear_queries()
        for server in (self.origin, self.public, *self.forbidden.values()):
            server.seen.clear()

    def send(self, raw: bytes, *, half_close: bool = False, wait: float = 5.0) -> Attack:
        """Send raw bytes, read until the proxy closes or stays quiet for `wait` seconds.

        `half_close` ends our sending side after the bytes, for cases where the proxy rightly
        keeps the connection open (a 403 or a 200): it then closes once it has answered. Cases
        that assert the proxy closes by itself (every 400) never half-close.
        """
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10) as sock:
            port = int(sock.getsockname()[1])
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            sock.settimeout(wait)
            chunks = []
            closed = False
            try:
                while data := sock.recv(65536):
                    chunks.append(data)
                else:
                    closed = True
            except TimeoutError:
                closed = False
            return Attack(data=b"".join(chunks), closed=closed, port=port)

    def records(self, attack: Attack, action: str, count: int = 1) -> list[dict[str, Any]]:
        """This attack's records of one kind (decision or close), oldest first."""
        return self.proxy.wait_records(
            lambda r: r["source"]["port"] == attack.port and r["event"]["action"] == action, count
        )

    def decision(self, attack: Attack) -> dict[str, Any]:
        return self.records(attack, "decision")[0]

    def close_reason(self, attack: Attack) -> str:
        return str(self.records(attack, "close")[-1]["outgate"]["reason"])

    def nothing_reached_forbidden(self) -> None:
        for address, server in self.forbidden.items():
            assert server.seen == [], f"a request reached {address}: {server.paths_seen()}"

    def every_audit_line_is_one_json_object(self) -> None:
        for line in list(self.proxy.raw_stdout):
            assert line.endswith(b"\n") and line.count(b"\n") == 1
            assert all(byte >= 0x20 for byte in line[:-1]), line
            assert isinstance(json.loads(line), dict)


@pytest.fixture(scope="module")
def attack_range(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Range]:
    """One proxy and its peers for a whole module (starting them per case would take most of
    the suite's time); `_fresh_range` resets what each case asserts on."""
    with contextlib.ExitStack() as stack:
        dns = stack.enter_context(ScriptedDNSServer())
        dns.addresses("origin.test", "127.0.0.1", ttl=0)
        origin = stack.enter_context(OriginServer())
        public = stack.enter_context(OriginServer(host=PUBLIC, port=80))
        forbidden = {
            address: stack.enter_context(OriginServer(host=address, port=80))
            for address in (METADATA, PRIVATE, "169.254.170.2", "fd00:ec2::254")
        }
        workdir = tmp_path_factory.mktemp("attack-range")
        proxy = stack.enter_context(
            ProxyProcess(
                workdir,
                policies=POLICIES,
                nameserver=dns.nameserver,
                config={
                    "identity": {
                        "static": [
                            {
                                "name": "test-client",
                                "namespace": "tests",
                                "cidrs": ["127.0.0.1/32"],
                                "labels": {"app": "client"},
                            },
                            {"name": "admin", "namespace": "ops", "cidrs": [f"{ADMIN_SOURCE}/32"]},
                        ]
                    },
                    "timeouts": {"header": "2s", "connect": "2s"},
                    "dns": {"timeout": "1s"},
                },
            )
        )
        yield Range(proxy=proxy, dns=dns, origin=origin, public=public, forbidden=forbidden)


@pytest.fixture(autouse=True)
def _fresh_range(request: pytest.FixtureRequest) -> None:
    if "attack_range" in request.fixturenames:
        request.getfixturevalue("attack_range").reset()
