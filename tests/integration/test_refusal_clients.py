"""What a user of a real client sees when the proxy refuses (issue 14, defect 3).

Many clients print only the status line of a refusal, never its body or `X-Outgate-Reason`, so
the reason is in the reason phrase too. Each client runs as its users run it, against the proxy
started as the CLI starts it, for a refused CONNECT (https://) and a refused plain request.
Go, Java, Node and the other clients are in the real-client matrix (tests/clients), which checks
the same for each of them inside the test network namespace."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests

from tests.support.clients import curl
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
