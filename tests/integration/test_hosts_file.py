"""Hosts entries (`dns.hostsFile`) answered before DNS, still decided by name and guarded by
address (issue 14, item 12). The proxy runs as the CLI runs it, with the scripted DNS server as
its only nameserver, so a query that should not happen would be seen there."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.support.clients import curl
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess
from tests.support.waiting import wait_for

StartProxy = Callable[..., ProxyProcess]


def start_with_hosts(
    start_proxy: StartProxy, dns: ScriptedDNSServer, hosts: Path, entries: str, policy: str
) -> ProxyProcess:
    """The proxy with `entries` as its hosts file and the scripted DNS server as nameserver."""
    hosts.write_text(entries)
    return start_proxy(policy, nameserver=dns.nameserver, config={"dns": {"hostsFile": str(hosts)}})


def metric(proxy: ProxyProcess, sample: str) -> float:
    _, text = proxy.admin("/metrics")
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_name_only_in_the_hosts_file_is_reachable_and_dns_is_not_asked(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer, origin: OriginServer, tmp_path: Path
) -> None:
    hosts = tmp_path / "hosts"
    proxy = start_with_hosts(
        start_proxy,
        dns_server,
        hosts,
        "127.0.0.1 legacy.internal  # a hostAliases entry\n",
        policy_allowing("legacy.internal"),
    )
    result = curl("-x", proxy.url, "-i", f"http://legacy.internal:{origin.port}/hello")
    assert result.stdout.startswith("HTTP/1.1 200"), result
    decision, close = proxy.records_by_path("/hello")
    assert decision["destination"]["domain"] == "legacy.internal"
    assert close["destination"]["ip"] == "127.0.0.1"
    assert dns_server.count("legacy.internal") == 0
    assert metric(proxy, 'outgate_dns_lookups_total{result="hosts"}') == 1.0


def test_a_hosts_entry_into_guarded_space_is_refused_unless_a_cidr_allows_it(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer, origin: OriginServer, tmp_path: Path
) -> None:
    hosts = tmp_path / "hosts"
    # The name is allowed, but no rule lists a cidr holding loopback.
    policy = policy_allowing("metadata.internal", cidrs=())
    proxy = start_with_hosts(
        start_proxy, dns_server, hosts, "127.0.0.1 metadata.internal\n", policy
    )
    result = curl("-x", proxy.url, "-i", f"http://metadata.internal:{origin.port}/hello")
    assert result.stdout.startswith("HTTP/1.1 403"), result
    assert "X-Outgate-Reason: guarded_address" in result.stdout
    decision, _ = proxy.records_by_path("/hello")
    assert decision["outgate"]["reason"] == "guarded_address"
    assert origin.seen == []


def test_a_denied_name_causes_no_lookup_in_the_hosts_file_or_dns(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer, origin: OriginServer, tmp_path: Path
) -> None:
    hosts = tmp_path / "hosts"
    dns_server.addresses("denied-dns.internal", "127.0.0.1")
    proxy = start_with_hosts(
        start_proxy,
        dns_server,
        hosts,
        "127.0.0.1 denied.internal\n",
        policy_allowing("other.internal"),
    )
    for name in ("denied.internal", "denied-dns.internal"):
        result = curl("-x", proxy.url, "-i", f"http://{name}:{origin.port}/{name}")
        assert result.stdout.startswith("HTTP/1.1 403"), result
        decision, _ = proxy.records_by_path(f"/{name}")
        assert decision["outgate"]["reason"] == "namespace_isolation"
    assert dns_server.queries == []
    assert metric(proxy, 'outgate_dns_lookups_total{result="hosts"}') == 0.0
    assert origin.seen == []


def test_the_hosts_file_is_read_again_when_it_changes(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer, origin: OriginServer, tmp_path: Path
) -> None:
    hosts = tmp_path / "hosts"
    policy = policy_allowing("first.internal", "second.internal")
    proxy = start_with_hosts(start_proxy, dns_server, hosts, "127.0.0.1 first.internal\n", policy)
    url = f"http://second.internal:{origin.port}/hello"
    # Not listed yet: DNS is asked (and has no such name).
    assert curl("-x", proxy.url, url, status_only=True).stdout == "502"
    # Replaced the way a kubelet updates a file: write aside, rename over.
    staged = tmp_path / "hosts.new"
    staged.write_text("127.0.0.1 first.internal second.internal\n")
    staged.rename(hosts)
    wait_for(
        lambda: curl("-x", proxy.url, url, status_only=True).stdout == "200",
        what="second.internal answered from the new hosts file",
    )
