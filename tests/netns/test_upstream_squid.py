"""Outgate chained to a real Squid as its parent proxy (issue 12), inside this test's network
namespace: origins on a public-looking address bound to the namespace's loopback, Squid on
127.0.0.1 resolving names from its hosts_file, Outgate resolving them with the scripted DNS
server. Nothing here can leave the machine."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.tls.ca import init_ca
from tests.support.clients import curl
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI, make_pki
from tests.support.proxyproc import ProxyProcess, outgate_command
from tests.support.squid import SquidParent
from tests.support.waiting import wait_for

StartProxy = Callable[..., ProxyProcess]

ORIGIN_IP = "11.0.0.1"
PRIVATE_IP = "10.0.0.5"
NAME = "api.allowed.example"
USER = "outgate"
PASSWORD = "parent-pw-7f3a91"
WRONG = "parent-pw-wrong-55c2"

POLICIES = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: upstream, namespace: tests}
spec:
  podSelector: {}
  rules:
    - name: allowed-api
      action: Allow
      to: [{fqdn: api.allowed.example}, {fqdn: refused.allowed.example}, {fqdn: "*.guard.test"}]
    - name: inspected-api
      action: Allow
      to: [{fqdn: inspect.allowed.example}]
      inspect: {methods: [GET]}
"""
INSPECTED = "inspect.allowed.example"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> OriginPKI:
    return make_pki(tmp_path_factory.mktemp("pki"), [NAME, "refused.allowed.example", INSPECTED])


@pytest.fixture
def origins(pki: OriginPKI) -> Iterator[dict[str, OriginServer]]:
    servers = {
        "https": OriginServer(host=ORIGIN_IP, port=443, ssl_context=pki.server_context()).start(),
        "http": OriginServer(host=ORIGIN_IP, port=80).start(),
        "private": OriginServer(host=PRIVATE_IP, port=80).start(),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def dns(dns_server: ScriptedDNSServer) -> ScriptedDNSServer:
    dns_server.addresses(NAME, ORIGIN_IP)
    dns_server.addresses("refused.allowed.example", ORIGIN_IP)
    dns_server.addresses(INSPECTED, ORIGIN_IP)
    dns_server.addresses("private.guard.test", PRIVATE_IP)
    return dns_server


def chained(
    start_proxy: StartProxy,
    dns: ScriptedDNSServer,
    squid: SquidParent,
    tls: dict[str, str] | None = None,
    scheme: str = "http",
    **upstream: Any,
) -> ProxyProcess:
    proxies = [f"{scheme}://127.0.0.1:{squid.port}"]
    config: dict[str, Any] = {
        "upstreams": [{"name": "corp", "proxies": proxies, **upstream}],
        "routes": {"default": "corp"},
    }
    if tls is not None:
        config["tls"] = tls
    return start_proxy(POLICIES, nameserver=dns.nameserver, config=config)


def fetch(
    proxy: ProxyProcess, pki: OriginPKI, url: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return curl("-x", proxy.url, "--cacert", str(pki.ca_pem), "-i", *extra, url, max_time=15)


def squid_hosts() -> dict[str, str]:
    return {
        NAME: ORIGIN_IP,
        "refused.allowed.example": ORIGIN_IP,
        INSPECTED: ORIGIN_IP,
        "private.guard.test": PRIVATE_IP,
    }


def test_https_and_plain_http_reach_the_origin_through_a_real_squid(
    start_proxy: StartProxy,
    dns: ScriptedDNSServer,
    origins: dict[str, OriginServer],
    pki: OriginPKI,
) -> None:
    with SquidParent(hosts=squid_hosts()) as squid:
        proxy = chained(start_proxy, dns, squid)
        secure = fetch(proxy, pki, f"https://{NAME}/hello?secure")
        plain = fetch(proxy, pki, f"http://{NAME}/hello?plain")
        tunnel_line = squid.wait_access(f"CONNECT {NAME}:443")
        forward_line = squid.wait_access(f"GET http://{NAME}/hello")
    assert secure.returncode == 0, secure.stderr
    assert "HTTP/1.1 200" in secure.stdout and secure.stdout.endswith("hello from origin\n")
    assert plain.returncode == 0 and plain.stdout.endswith("hello from origin\n")
    assert origins["https"].paths_seen() == ["/hello?secure"]
    assert origins["http"].paths_seen() == ["/hello?plain"]
    assert "TCP_TUNNEL/200" in tunnel_line
    assert "/200 " in forward_line
    label = f"127.0.0.1:{squid.port}"
    _, tunnel_close = proxy.records_for(
        proxy.wait_records(
            lambda r: r["event"]["action"] == "close" and r["outgate"]["connection"] == "tunnel"
        )[0]["event"]["id"]
    )
    _, forward_close = proxy.records_by_path("/hello?plain")
    for record in (tunnel_close, forward_close):
        assert record["outgate"]["upstream"] == {"name": "corp", "proxy": label, "resolve": "local"}
        assert record["outgate"]["reason"] == "completed"


def test_a_name_the_proxys_dns_puts_in_guarded_space_is_refused_before_the_parent(
    start_proxy: StartProxy,
    dns: ScriptedDNSServer,
    origins: dict[str, OriginServer],
    pki: OriginPKI,
) -> None:
    with SquidParent(hosts=squid_hosts()) as squid:
        proxy = chained(start_proxy, dns, squid)
        plain = fetch(proxy, pki, "http://private.guard.test/hello?inside")
        tunnel = fetch(proxy, pki, "https://private.guard.test/hello?inside")
        # Squid is still there and answering: what it logged is all it was asked.
        control = fetch(proxy, pki, f"http://{NAME}/hello?control")
        squid.wait_access(f"GET http://{NAME}/hello")  # Squid logs URLs without the query
        lines = squid.access_lines()
    assert plain.stdout.startswith("HTTP/1.1 403") and "guarded_address" in plain.stdout
    assert tunnel.returncode != 0 and "403" in tunnel.stderr
    assert control.returncode == 0
    assert not [line for line in lines if "private.guard.test" in line]
    assert origins["private"].seen == []


def test_a_squid_refusal_of_connect_reaches_the_client_as_502_with_the_parents_status(
    start_proxy: StartProxy,
    dns: ScriptedDNSServer,
    origins: dict[str, OriginServer],
    pki: OriginPKI,
) -> None:
    with SquidParent(hosts=squid_hosts(), deny_domains=("refused.allowed.example",)) as squid:
        proxy = chained(start_proxy, dns, squid)
        refused = curl(
            "-x",
            proxy.url,
            "-v",
            "--cacert",
            str(pki.ca_pem),
            "https://refused.allowed.example/",
            max_time=15,
        )
        squid.wait_access("CONNECT refused.allowed.example:443")
    assert refused.returncode != 0
    assert "502" in refused.stderr
    assert origins["https"].seen == []
    close = proxy.wait_records(
        lambda r: (
            r["event"]["action"] == "close"
            and r["destination"]["domain"] == "refused.allowed.example"
        )
    )[0]
    assert close["outgate"]["reason"] == "upstream_proxy_refused"
    assert close["outgate"]["upstream"]["status"] == 403


def test_parent_credentials_are_sent_reread_and_never_shown(
    start_proxy: StartProxy,
    dns: ScriptedDNSServer,
    origins: dict[str, OriginServer],
    pki: OriginPKI,
    tmp_path: Path,
) -> None:
    credentials = tmp_path / "parent-credentials"
    credentials.write_text(f"{USER}:{PASSWORD}\n")
    shown: list[str] = []
    with SquidParent(hosts=squid_hosts(), user=USER, password=PASSWORD) as squid:
        proxy = chained(start_proxy, dns, squid, credentialsFile=str(credentials))
        for url in (f"https://{NAME}/hello?authed", f"http://{NAME}/hello?authed"):
            ok = fetch(proxy, pki, url, "-v")
            shown += [ok.stdout, ok.stderr]
            assert ok.returncode == 0 and ok.stdout.endswith("hello from origin\n"), ok.stderr
        squid.wait_access(f"GET http://{NAME}/hello")
        assert [line for line in squid.access_lines() if f" {USER} " in line]

        # A rotated Secret with a password the parent does not take: re-read, then refused.
        credentials.write_text(f"{USER}:{WRONG}\n")

        def refused_now() -> subprocess.CompletedProcess[str] | None:
            attempt = fetch(proxy, pki, f"http://{NAME}/hello?rotated", "-v")
            shown.extend([attempt.stdout, attempt.stderr])
            return attempt if attempt.stdout.startswith("HTTP/1.1 502") else None

        plain = wait_for(refused_now, timeout=10, what="the rotated credentials to be used")
        tunnel = fetch(proxy, pki, f"https://{NAME}/hello?rotated", "-v")
        shown += [tunnel.stdout, tunnel.stderr]
        status, metrics_text = proxy.admin("/metrics")
        assert status == 200
        explained = subprocess.run(
            [
                *outgate_command(),
                "explain",
                "--config",
                str(proxy.config_path),
                "--source",
                "127.0.0.1",
                "--url",
                f"https://{NAME}/",
                "--resolve",
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=proxy.workdir,
        )
    assert "upstream_proxy_refused" in plain.stdout
    assert tunnel.returncode != 0 and "502" in tunnel.stderr
    rotated = [
        r
        for r in proxy.records
        if r["event"]["action"] == "close" and r["outgate"]["reason"] == "upstream_proxy_refused"
    ]
    assert rotated and {r["outgate"]["upstream"]["status"] for r in rotated} == {407}
    assert explained.returncode == 0, explained.stderr
    assert "via upstream corp" in explained.stdout
    shown += [
        b"".join(proxy.raw_stdout).decode(),
        "\n".join(str(entry) for entry in proxy.logs),
        metrics_text,
        explained.stdout,
        explained.stderr,
    ]
    everything = "\n".join(shown)
    for secret in (PASSWORD, WRONG):
        for form in (secret, base64.b64encode(f"{USER}:{secret}".encode()).decode()):
            assert form not in everything, "a parent credential was shown"


def test_an_inspect_rule_checks_each_request_inside_a_tunnel_through_squid(
    start_proxy: StartProxy,
    dns: ScriptedDNSServer,
    origins: dict[str, OriginServer],
    pki: OriginPKI,
    tmp_path: Path,
) -> None:
    ca_cert, ca_key = init_ca(tmp_path / "outgate-ca")
    tls = {"caCert": str(ca_cert), "caKey": str(ca_key), "upstreamCABundle": str(pki.ca_pem)}
    with SquidParent(hosts=squid_hosts()) as squid:
        proxy = chained(start_proxy, dns, squid, tls=tls)
        url = f"https://{INSPECTED}/hello"
        got = curl("-x", proxy.url, "--cacert", str(ca_cert), f"{url}?inspected", max_time=15)
        posted = curl(
            "-x",
            proxy.url,
            "--cacert",
            str(ca_cert),
            "-i",
            "--data",
            "x",
            f"{url}?posted",
            max_time=15,
        )
        squid.wait_access(f"CONNECT {INSPECTED}:443")
    assert got.returncode == 0 and got.stdout == "hello from origin\n", got.stderr
    assert "\nHTTP/1.1 403 " in posted.stdout and "method_not_allowed" in posted.stdout
    assert origins["https"].paths_seen() == ["/hello?inspected"]
    inner = proxy.wait_records(
        lambda r: r["event"]["action"] == "close" and r["outgate"]["connection"] == "intercept"
    )
    assert {r["outgate"]["upstream"]["name"] for r in inner} == {"corp"}


def test_an_https_parent_is_reached_over_verified_tls_and_refused_when_unverified(
    start_proxy: StartProxy,
    dns: ScriptedDNSServer,
    origins: dict[str, OriginServer],
    pki: OriginPKI,
    tmp_path: Path,
) -> None:
    parent_pki = make_pki(tmp_path / "parent-pki", ["127.0.0.1"])
    stranger = make_pki(tmp_path / "stranger-pki", ["127.0.0.1"])
    with SquidParent(hosts=squid_hosts(), tls=parent_pki) as squid:
        trusted = chained(start_proxy, dns, squid, scheme="https", caBundle=str(parent_pki.ca_pem))
        untrusted = chained(start_proxy, dns, squid, scheme="https", caBundle=str(stranger.ca_pem))
        secure = fetch(trusted, pki, f"https://{NAME}/hello?over-tls")
        plain = fetch(trusted, pki, f"http://{NAME}/hello?over-tls")
        refused = fetch(untrusted, pki, f"http://{NAME}/hello?unverified")
        squid.wait_access(f"CONNECT {NAME}:443")
    assert secure.returncode == 0 and secure.stdout.endswith("hello from origin\n"), secure.stderr
    assert plain.returncode == 0 and plain.stdout.endswith("hello from origin\n")
    assert (
        refused.stdout.startswith("HTTP/1.1 502") and "upstream_proxy_unavailable" in refused.stdout
    )
    assert origins["http"].paths_seen() == ["/hello?over-tls"]
    assert "certificate verify failed" in refused.stdout.lower()
