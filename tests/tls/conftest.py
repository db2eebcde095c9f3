"""Module-wide peers for the TLS tests: DNS, origin CA and origins, the Outgate CA, and one proxy
started as the CLI starts it, with a rule per behaviour under test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tls.ca import init_ca
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import allow_rule, client_policy
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess
from tests.tls.servers import OriginCA

DLP_ALL = (
    "[aws-access-key, private-key, bearer-to-other-host, gcp-service-account-key,"
    " github-token, slack-token]"
)
INSPECT_PATHS = '["/hello", "/echo", "/headers", "/status/*"]'

NAMES = [
    "origin.test",
    "recorder.test",
    "tls-only.test",
    "optional.test",
    "noech.test",
    "ssh.test",
    "pg.test",
    "plain.test",
    "raw.test",
    "inspect.test",
    "open.test",
    "selfsigned.test",
    "expired.test",
    "wrongname.test",
    "plain-inspect.test",
    "denied.test",
]


POLICY = client_policy(
    "tls",
    # First: a CONNECT to 127.0.0.1 itself is decided by this rule (protocol tls, SNI checked
    # against policy as a name); names are decided by their own rules below.
    allow_rule("by-ip"),
    allow_rule("tls-default", "origin.test", "recorder.test"),
    allow_rule("tls-only", "tls-only.test", extra="protocol: tls"),
    allow_rule("sni-optional", "optional.test", extra="tls: {sni: optional}"),
    allow_rule("ech-deny", "noech.test", extra="tls: {ech: deny}"),
    allow_rule("ssh", "ssh.test", extra="protocol: ssh"),
    allow_rule("postgres", "pg.test", extra="protocol: postgres"),
    allow_rule("http", "plain.test", extra="protocol: http"),
    allow_rule("tcp", "raw.test", extra="protocol: tcp"),
    allow_rule(
        "inspect",
        "inspect.test",
        extra=f"inspect: {{methods: [GET, POST], paths: {INSPECT_PATHS}, dlp: {DLP_ALL}}}",
    ),
    allow_rule("inspect-open", "open.test", extra="inspect: {}"),
    allow_rule(
        "inspect-bad-origins",
        "selfsigned.test",
        "expired.test",
        "wrongname.test",
        extra="inspect: {}",
    ),
    allow_rule(
        "http-inspect", "plain-inspect.test", extra="protocol: http\ninspect: {methods: [GET]}"
    ),
)


@pytest.fixture(scope="module")
def tls_dns() -> Iterator[ScriptedDNSServer]:
    with ScriptedDNSServer() as server:
        for name in NAMES:
            server.addresses(name, "127.0.0.1")
        yield server


@pytest.fixture(scope="module")
def origin_ca(tmp_path_factory: pytest.TempPathFactory) -> OriginCA:
    return OriginCA(tmp_path_factory.mktemp("origin-ca"))


@pytest.fixture(scope="module")
def outgate_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return init_ca(tmp_path_factory.mktemp("outgate-ca"))


@pytest.fixture(scope="module")
def https_origin(origin_ca: OriginCA) -> Iterator[OriginServer]:
    names = ["origin.test", "optional.test", "noech.test", "inspect.test", "open.test", "127.0.0.1"]
    with OriginServer(ssl_context=origin_ca.server_context(names)) as server:
        yield server


@pytest.fixture(scope="module")
def http_origin() -> Iterator[OriginServer]:
    with OriginServer() as server:
        yield server


def proxy_config(outgate_ca: tuple[Path, Path], origin_ca: OriginCA, **timeouts: str) -> dict:  # type: ignore[type-arg]
    return {
        "tls": {
            "caCert": str(outgate_ca[0]),
            "caKey": str(outgate_ca[1]),
            "upstreamCABundle": str(origin_ca.ca_pem),
        },
        "timeouts": {"sniPeek": "3s", **timeouts},
        "dlp": {
            "custom": [
                {"name": "internal-header", "headerName": "(?i)^x-internal-"},
                {"name": "ticket-ids", "headerValue": "TICKET-[0-9]{6}"},
                {"name": "customer-email", "query": "[a-z]+@corp\\.example"},
                # Catastrophic backtracking on a backtracking engine: 2^n steps for n a's
                # followed by anything else (test_intercept.py sends one).
                {"name": "backtracking-trap", "headerValue": "(a+)+$"},
            ]
        },
    }


@pytest.fixture(scope="module")
def tls_proxy(
    tmp_path_factory: pytest.TempPathFactory,
    tls_dns: ScriptedDNSServer,
    outgate_ca: tuple[Path, Path],
    origin_ca: OriginCA,
) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(
        tmp_path_factory.mktemp("tls-proxy"),
        policies=POLICY,
        nameserver=tls_dns.nameserver,
        config=proxy_config(outgate_ca, origin_ca),
    )
    with proxy:
        yield proxy
