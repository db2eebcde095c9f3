"""Fixtures: real origins (HTTP and HTTPS with a test CA) and proxies started as the CLI does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI, make_pki
from tests.support.proxyproc import ProxyProcess

# Test origins listen on ephemeral ports, so test policies allow the whole unprivileged range.
ORIGIN_PORTS = "[{port: 1024, endPort: 65535}, 80, 443]"


def policy_allowing(
    *fqdns: str,
    cidrs: tuple[str, ...] = ("127.0.0.0/8",),
    name: str = "tests",
    namespace: str = "tests",
    pod_selector: str = "{matchLabels: {app: client}}",
) -> str:
    """A namespace policy for the test client allowing these names (and loopback as a cidr,
    which the address guard needs before it lets the proxy dial a loopback origin). Another
    `namespace` and `pod_selector` make it a policy for another (static) workload."""
    to = [f'{{fqdn: "{f}"}}' for f in fqdns] + [f"{{cidr: {c}}}" for c in cidrs]
    return f"""
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  podSelector: {pod_selector}
  rules:
    - name: allow-origins
      action: Allow
      to: [{", ".join(to)}]
      ports: {ORIGIN_PORTS}
"""


def allow_rule(name: str, *fqdns: str, extra: str = "") -> str:
    """One Allow rule for these names and loopback on the origin ports, with `extra` YAML keys
    (protocol, inspect, tls), indented for `client_policy`."""
    to = ", ".join([*(f"{{fqdn: {f}}}" for f in fqdns), "{cidr: 127.0.0.0/8}"])
    text = (
        f"    - name: {name}\n      action: Allow\n      to: [{to}]\n      ports: {ORIGIN_PORTS}\n"
    )
    return text + "".join(f"      {line}\n" for line in extra.splitlines() if line)


def client_policy(name: str, *rules: str) -> str:
    """A namespace policy for the test client (app=client in namespace tests) with `rules`."""
    return (
        "apiVersion: outgate.dev/v1alpha1\nkind: EgressPolicy\n"
        f"metadata: {{name: {name}, namespace: tests}}\n"
        "spec:\n  podSelector: {matchLabels: {app: client}}\n  rules:\n" + "".join(rules)
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> OriginPKI:
    return make_pki(tmp_path_factory.mktemp("pki"), ["origin.test", "localhost", "127.0.0.1"])


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    with OriginServer() as server:
        yield server


@pytest.fixture
def tls_origin(pki: OriginPKI) -> Iterator[OriginServer]:
    with OriginServer(ssl_context=pki.server_context()) as server:
        yield server


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(policies: str, **kwargs: Any) -> ProxyProcess:
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        proxy = ProxyProcess(workdir, policies=policies, **kwargs)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()
