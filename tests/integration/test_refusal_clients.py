"""What a user of a real client sees when the proxy refuses (issue 14, defect 3).

Many clients print only the status line of a refusal, never its body or `X-Outgate-Reason`, so
the reason is in the reason phrase too. Each client runs as its users run it, against the proxy
started as the CLI starts it, for a refused CONNECT (https://) and a refused plain request."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.support.clients import curl, go_client
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.proxyproc import ProxyProcess

StartProxy = Callable[..., ProxyProcess]

DENYING_POLICY = """
apiVersion: outgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: no-paste-sites}
spec:
  tier: admin
  rules:
    - name: paste-sites
      action: Deny
      to: [{fqdn: paste.test}]
"""
PHRASE = "Forbidden by egress policy: rule_deny"
PLAIN = "http://paste.test/raw/x"
TUNNELLED = "https://paste.test/"


@pytest.fixture
def proxy(start_proxy: StartProxy, dns_server: ScriptedDNSServer) -> ProxyProcess:
    return start_proxy(DENYING_POLICY, nameserver=dns_server.nameserver)


@pytest.fixture(scope="session")
def go_binary(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per machine into pytest's cache (per session when the cache is off)."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return go_client(tmp_path_factory.mktemp("goclient"))
    return go_client(Path(cache.mkdir("goclient")))


def test_curl_shows_the_reason_of_a_refused_request_and_a_refused_connect(
    proxy: ProxyProcess,
) -> None:
    # Without -i curl prints the body, which names the reason; with -i the status line does too.
    assert "reason: rule_deny" in curl("-x", proxy.url, PLAIN).stdout
    plain = curl("-x", proxy.url, "-i", PLAIN)
    assert plain.stdout.splitlines()[0] == f"HTTP/1.1 403 {PHRASE}", plain.stdout
    # A refused CONNECT: curl prints only "CONNECT tunnel failed, response 403" unless asked for
    # the proxy's headers (-i shows them, -v too).
    tunnelled = curl("-x", proxy.url, "-i", TUNNELLED)
    assert tunnelled.returncode != 0
    assert f"HTTP/1.1 403 {PHRASE}" in tunnelled.stdout, (tunnelled.stdout, tunnelled.stderr)


def test_requests_raises_with_the_reason_for_a_refused_request_and_a_refused_connect(
    proxy: ProxyProcess,
) -> None:
    proxies = {"http": proxy.url, "https": proxy.url}
    response = requests.get(PLAIN, proxies=proxies, timeout=20)
    with pytest.raises(requests.HTTPError) as refused:
        response.raise_for_status()
    assert PHRASE in str(refused.value)
    with pytest.raises(requests.exceptions.ProxyError) as tunnel_refused:
        requests.get(TUNNELLED, proxies=proxies, timeout=20)
    assert PHRASE in str(tunnel_refused.value)


def test_a_go_program_prints_the_reason_for_a_refused_request_and_a_refused_connect(
    proxy: ProxyProcess, go_binary: Path
) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    env["HTTP_PROXY"] = env["HTTPS_PROXY"] = proxy.url
    plain = subprocess.run(
        [go_binary, PLAIN], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert plain.stdout.strip() == f"403 {PHRASE}", plain
    tunnelled = subprocess.run(
        [go_binary, TUNNELLED], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert tunnelled.returncode == 1
    assert PHRASE in tunnelled.stdout, tunnelled
