"""`outgate import-squid` end to end (issue 12, point 8): a squid.conf that chains to a parent
with `cache_peer` and `never_direct allow all` is imported by the CLI, and Outgate run with
exactly the imported policies, static identities, upstreams and routes sends every allowed
request through that parent, a real Squid, and refuses the rest before asking it. Inside this
test's network namespace: nothing here can leave the machine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from tests.adoption.helpers import outgate
from tests.support.clients import curl
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.origin import OriginServer
from tests.support.pki import make_pki
from tests.support.proxyproc import ProxyProcess
from tests.support.squid import SquidParent

ORIGIN_IP = "11.0.0.2"  # bound to this namespace's loopback by tests/netns/enter.sh
NAME = "www.imported.example"
OTHER = "other.imported.example"

# What an operator's squid.conf says: these clients may reach NAME, and nothing goes direct.
SQUID_CONF = """
http_port 3128
acl clients src 127.0.0.1/32
acl SSL_ports port 443
acl Safe_ports port 80 443
acl CONNECT method CONNECT
acl allowed dstdomain {name}
http_access deny !Safe_ports
http_access deny CONNECT !SSL_ports
http_access allow clients allowed
http_access deny all
cache_peer 127.0.0.1 parent {port} 0 no-query default name=corp
never_direct allow all
"""


def test_an_imported_never_direct_config_sends_allowed_requests_through_the_squid_parent(
    start_proxy: Callable[..., ProxyProcess], dns_server: ScriptedDNSServer, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki", [NAME])
    dns_server.addresses(NAME, ORIGIN_IP)
    dns_server.addresses(OTHER, ORIGIN_IP)
    secure_origin = OriginServer(host=ORIGIN_IP, port=443, ssl_context=pki.server_context())
    plain_origin = OriginServer(host=ORIGIN_IP, port=80)
    with (
        secure_origin,
        plain_origin,
        SquidParent(hosts={NAME: ORIGIN_IP, OTHER: ORIGIN_IP}) as squid,
    ):
        conf, policies, fragment = (
            tmp_path / "squid.conf",
            tmp_path / "policies.yaml",
            tmp_path / "fragment.yaml",
        )
        conf.write_text(SQUID_CONF.format(name=NAME, port=squid.port))
        imported = outgate(
            "import-squid", str(conf), "-o", str(policies), "--config-out", str(fragment)
        )
        assert imported.returncode == 0, imported.stderr  # nothing untranslated
        config = yaml.safe_load(fragment.read_text())
        assert config["routes"] == {"default": "corp"}
        proxy = start_proxy(
            policies.read_text(),
            nameserver=dns_server.nameserver,
            config={key: config[key] for key in ("identity", "upstreams", "routes")},
        )
        proxy_args = ("-x", proxy.url, "--cacert", str(pki.ca_pem), "-i")
        secure = curl(*proxy_args, f"https://{NAME}/hello?secure", max_time=15)
        plain = curl(*proxy_args, f"http://{NAME}/hello?plain", max_time=15)
        refused = curl(*proxy_args, f"http://{OTHER}/hello?refused", max_time=15)
        tunnel_line = squid.wait_access(f"CONNECT {NAME}:443")
        forward_line = squid.wait_access(f"GET http://{NAME}/hello")
        squid_saw = squid.access_lines()
    assert "HTTP/1.1 200" in secure.stdout and secure.stdout.endswith("hello from origin\n")
    assert plain.stdout.endswith("hello from origin\n"), plain.stdout + plain.stderr
    assert "TCP_TUNNEL/200" in tunnel_line and "/200 " in forward_line
    assert "HTTP/1.1 403" in refused.stdout  # policy first: the parent is never asked
    assert not any(OTHER in line for line in squid_saw)
    label = f"127.0.0.1:{squid.port}"
    _, forward_close = proxy.records_by_path("/hello?plain")
    assert forward_close["outgate"]["upstream"]["name"] == "corp"
    assert forward_close["outgate"]["upstream"]["proxy"] == label
    tunnel_close = proxy.wait_records(
        lambda r: r["event"]["action"] == "close" and r["outgate"].get("connection") == "tunnel"
    )[0]
    assert tunnel_close["outgate"]["upstream"]["name"] == "corp"
