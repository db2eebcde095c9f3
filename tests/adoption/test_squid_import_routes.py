"""`outgate import-squid` and parent proxies: `cache_peer`, `cache_peer_access`, `never_direct`
and `always_direct` become the runtime config's upstreams and routes, which load with the real
config loader and route every destination as Squid would choose between a parent and direct;
what has no route form is reported with its file and line, and a parent's password appears in
no output."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from proxy.adoption.squid_import import ImportOptions, ImportResult, Severity, import_squid
from proxy.config import Settings, settings_from_mapping
from proxy.core.hosts import parse_host
from proxy.core.policy.model import Destination
from tests.adoption.helpers import DATA, POD, engine_for, import_text, line_of, outgate

PARENT_ONLY = DATA / "parent-only" / "squid.conf"
CORPORATE = DATA / "corporate-parents" / "squid.conf"
REALISTIC = DATA / "realistic" / "squid.conf"
PASSWORD = "Sup3r-S3cret!"  # the login= password in CORPORATE


def settings_of(result: ImportResult, tmp_path: Path) -> Settings:
    """The fragment loaded by the runtime config's own loader (refuses a bad shape)."""
    return settings_from_mapping(result.config, file="fragment.yaml", base_dir=tmp_path)


def route(settings: Settings, host: str, resolved: list[str] | None = None) -> str:
    """The way out for `host` (`direct` or an upstream), as the router chooses it."""
    assert settings.routes is not None
    addresses = [ipaddress.ip_address(a) for a in resolved] if resolved else None
    return settings.routes.select(parse_host(host), 443, addresses)


def lines_with(result: ImportResult, severity: Severity, text: str) -> set[int]:
    return {
        f.location.line
        for f in result.findings
        if f.severity is severity and text in f.message and f.location is not None
    }


# -- the acceptance configuration: one parent, never direct ------------------------------------

# (host, port, addresses the name resolved to): requests the imported policies allow.
ALLOWED_REQUESTS = [
    ("github.com", 443, ["140.82.112.3"]),
    ("api.github.com", 443, ["140.82.112.6"]),
    ("pypi.org", 443, ["151.101.0.223"]),
    ("files.pythonhosted.org", 443, ["151.101.1.63"]),
    ("github.com", 80, ["140.82.112.3"]),
    ("198.51.100.7", 443, None),  # an IP literal allowed by the dst ACL
]


def test_never_direct_allow_all_sends_every_allowed_request_via_the_parent(
    tmp_path: Path,
) -> None:
    result = import_squid(PARENT_ONLY, ImportOptions(cluster_sources=frozenset({"localnet"})))
    assert result.untranslated == ()
    assert result.config["upstreams"] == [
        {"name": "proxy-corp-example", "proxies": ["http://proxy.corp.example:3128"]}
    ]
    assert result.config["routes"] == {"default": "proxy-corp-example"}  # no rule at all
    settings = settings_of(result, tmp_path)
    engine = engine_for(result)
    for host, port, resolved in ALLOWED_REQUESTS:
        parsed = parse_host(host)
        decision = engine.decide(POD, Destination(host=parsed, port=port, ip=parsed.ip))
        assert str(decision.action) == "allow", host
        assert route(settings, host, resolved) == "proxy-corp-example", host
    # And a name that resolves into an address some rule could send direct still goes via it.
    assert route(settings, "github.com", ["10.1.2.3"]) == "proxy-corp-example"


def test_never_direct_import_from_the_cli_passes_check_config(tmp_path: Path) -> None:
    policies, fragment = tmp_path / "policies.yaml", tmp_path / "fragment.yaml"
    result = outgate(
        "import-squid",
        str(PARENT_ONLY),
        "--cluster-src",
        "localnet",
        "-o",
        str(policies),
        "--config-out",
        str(fragment),
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(fragment.read_text())
    assert config["routes"] == {"default": "proxy-corp-example"}
    config["policies"] = {"paths": ["policies.yaml"]}
    (tmp_path / "outgate.yaml").write_text(yaml.safe_dump(config))
    checked = outgate("check-config", str(tmp_path / "outgate.yaml"))
    assert checked.returncode == 0, checked.stderr


# -- several parents, per-destination parents, always_direct -------------------------------------


def test_corporate_parents_become_upstreams_and_routes(tmp_path: Path) -> None:
    result = import_squid(CORPORATE)
    # The two corporate proxies share their access and credentials: one upstream, in file order.
    assert result.config["upstreams"] == [
        {
            "name": "corp",
            "proxies": ["http://proxy-a.corp.example:3128", "http://proxy-b.corp.example:3128"],
            "credentialsFile": "/etc/outgate/upstream-corp/credentials",
            "connectTimeout": "5s",
            "failLimit": 2,
            "retryAfter": "30s",
        },
        {
            "name": "partner",
            "proxies": ["https://gw.partner.example:8443"],
            "caBundle": "/etc/squid/partner-ca.pem",
            "connectTimeout": "20s",  # peer_connect_timeout
            "retryAfter": "30s",  # dead_peer_timeout
        },
        {
            "name": "legacy-corp-example",
            "proxies": ["http://legacy.corp.example:8080"],
            "connectTimeout": "20s",
            "retryAfter": "30s",
        },
    ]
    assert result.config["routes"] == {
        "default": "corp",
        "rules": [
            {"to": [{"fqdn": "corp.example"}, {"fqdn": "*.corp.example"}], "via": "direct"},
            {"to": [{"cidr": "10.0.0.0/8"}], "via": "direct"},
            {"to": [{"fqdn": "partner.example"}, {"fqdn": "*.partner.example"}], "via": "partner"},
        ],
    }
    settings = settings_of(result, tmp_path)
    assert route(settings, "git.corp.example") == "direct"  # always_direct allow intranet
    assert route(settings, "corp.example") == "direct"
    assert route(settings, "10.20.30.40") == "direct"  # always_direct allow intranet_nets
    assert route(settings, "wiki.example", ["10.20.30.40"]) == "direct"  # dst: resolved address
    assert route(settings, "api.partner.example") == "partner"  # cache_peer_access partner
    assert route(settings, "github.com", ["140.82.112.3"]) == "corp"  # never_direct allow all
    assert route(settings, "corp.example.attacker.example") == "corp"


def test_corporate_parents_report_what_has_no_route_form() -> None:
    result = import_squid(CORPORATE)

    def line(text: str) -> int:
        return line_of(CORPORATE, text)

    sibling, legacy = line("sibling 3128"), line("login=PASSTHRU")
    proxy_a, proxy_b = line("proxy-a.corp.example"), line("proxy-b.corp.example")
    assert lines_with(result, Severity.UNTRANSLATED, "a sibling peer") == {sibling}
    assert lines_with(result, Severity.UNTRANSLATED, "never forwards a client's credentials") == {
        legacy
    }
    assert lines_with(result, Severity.UNTRANSLATED, "pods is a src ACL") == {
        line("cache_peer_access legacy.corp.example allow pods")
    }
    assert lines_with(result, Severity.WARNING, "never used by the routes") == {legacy}
    assert lines_with(result, Severity.WARNING, "tries an upstream's proxies in order") == {
        proxy_a,
        proxy_b,
    }
    # The credentials: one finding for the upstream, naming the file to put them in.
    (credentials,) = [
        f for f in result.untranslated if "credentials" in f.message and "login=:" in f.message
    ]
    assert credentials.location is not None and credentials.location.line == proxy_a
    assert "/etc/outgate/upstream-corp/credentials" in credentials.message
    # With never_direct allow all, nothing warns about a fallback to direct.
    assert not lines_with(result, Severity.WARNING, "goes direct when")
    assert {f.location.line for f in result.untranslated if f.location} == {
        sibling,
        legacy,
        proxy_a,
        line("cache_peer_access legacy.corp.example allow pods"),
    }


def test_a_parents_password_appears_in_no_output(tmp_path: Path) -> None:
    result = import_squid(CORPORATE)
    assert PASSWORD not in result.policies_yaml  # the header holds findings and the fragment
    assert PASSWORD not in result.report()
    assert PASSWORD not in yaml.safe_dump(result.config)
    assert "login=egress:***" in result.report()  # the directive is shown, masked
    policies, fragment = tmp_path / "policies.yaml", tmp_path / "fragment.yaml"
    run = outgate("import-squid", str(CORPORATE), "--config-out", str(fragment))
    assert run.returncode == 3  # written, with untranslated lines (the credentials among them)
    for output in (run.stdout, run.stderr, fragment.read_text()):
        assert "S3cret" not in output
    assert "/etc/outgate/upstream-corp/credentials" in run.stderr
    run = outgate("import-squid", str(CORPORATE), "-o", str(policies))
    assert "S3cret" not in policies.read_text() + run.stdout + run.stderr


def test_always_direct_comes_before_the_parents_whatever_the_file_order(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "acl example dstdomain .example.com\n"
        "acl inside dstdomain internal.example.com\n"
        "cache_peer proxy-a parent 3128 0 name=a\n"
        "cache_peer proxy-b parent 3128 0 name=b\n"
        "cache_peer_access a allow example\n"
        "cache_peer_access a deny all\n"
        "never_direct allow all\n"
        "always_direct allow inside\n",  # after never_direct: Squid checks it first anyway
    )
    routes = result.config["routes"]
    assert routes["rules"][0] == {"to": [{"fqdn": "internal.example.com"}], "via": "direct"}
    assert [rule["via"] for rule in routes["rules"]] == ["direct", "a"]
    assert routes["default"] == "b"  # the parent that takes every destination
    settings = settings_of(result, tmp_path)
    assert route(settings, "internal.example.com") == "direct"
    assert route(settings, "www.example.com") == "a"
    assert route(settings, "pypi.org") == "b"
    assert result.untranslated == ()


def test_default_flag_chooses_the_parent_for_every_other_destination(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "cache_peer proxy-a parent 3128 0 login=one:Pw-0ne-x7\n"
        "cache_peer proxy-b parent 3128 0 login=two:Pw-Tw0-y8 default\n"
        "never_direct allow all\n",
    )
    # Different credentials: two upstreams; `default` picks the one for routes.default.
    names = [u["name"] for u in result.config["upstreams"]]
    assert names == ["proxy-a", "proxy-b"]
    assert result.config["routes"] == {"default": "proxy-b"}
    assert lines_with(result, Severity.WARNING, "never used by the routes") == {1}
    for secret in ("Pw-0ne-x7", "Pw-Tw0-y8"):
        assert secret not in result.report() + yaml.safe_dump(result.config)


def test_parents_without_never_direct_warn_that_outgate_has_no_direct_fallback(
    tmp_path: Path,
) -> None:
    result = import_squid(REALISTIC)  # cache_peer ... default, no never_direct
    assert result.config["routes"] == {"default": "parent-corp-example"}
    peer_line = line_of(REALISTIC, "cache_peer ")
    (warning,) = [f for f in result.warnings if "never_direct allow all" in f.message]
    assert warning.location is not None and warning.location.line == peer_line
    assert "goes direct when they fail" in warning.message
    assert "CONNECT" in warning.message  # nonhierarchical_direct on, Squid's default
    assert peer_line not in {f.location.line for f in result.untranslated if f.location}


def test_prefer_direct_keeps_direct_the_default_and_never_direct_lines_use_the_parent(
    tmp_path: Path,
) -> None:
    result = import_text(
        tmp_path,
        "acl github dstdomain .github.com\n"
        "acl partner dstdomain .partner.example\n"
        "cache_peer corp.example parent 3128 0\n"
        "cache_peer gw.partner.example parent 3128 0\n"
        "cache_peer_access gw.partner.example allow partner\n"
        "cache_peer_access gw.partner.example deny all\n"
        "prefer_direct on\n"
        "never_direct allow github\n"
        "never_direct allow partner\n",
    )
    settings = settings_of(result, tmp_path)
    assert result.config["routes"]["default"] == "direct"
    assert route(settings, "api.github.com") == "corp-example"
    assert route(settings, "www.partner.example") == "gw-partner-example"
    assert route(settings, "pypi.org") == "direct"
    assert lines_with(result, Severity.WARNING, "tries direct first") == {7}


def test_cache_peer_access_exceptions_leave_destinations_to_other_parents_or_direct(
    tmp_path: Path,
) -> None:
    result = import_text(
        tmp_path,
        "acl intranet dstdomain .corp.example\n"
        "acl partner dstdomain .partner.example\n"
        "cache_peer proxy.corp.example parent 3128 0 name=corp\n"
        "cache_peer gw.partner.example parent 3128 0 name=partner\n"
        "cache_peer_access corp deny intranet\n"
        "cache_peer_access corp deny partner\n"
        "cache_peer_access corp allow all\n"
        "cache_peer_access partner allow partner\n"
        "cache_peer_access partner deny all\n",
    )
    settings = settings_of(result, tmp_path)
    assert route(settings, "www.partner.example") == "partner"  # the parent that takes it
    assert route(settings, "git.corp.example") == "direct"  # no parent takes it: Squid goes direct
    assert route(settings, "pypi.org") == "corp"
    assert result.untranslated == ()
    assert lines_with(result, Severity.NOTE, "an exception to squid.conf:7") == {5, 6}


def test_an_allow_of_all_but_some_destinations_under_never_direct_warns(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "acl intranet dstdomain .corp.example\n"
        "cache_peer proxy.corp.example parent 3128 0 name=corp\n"
        "cache_peer_access corp allow !intranet\n"
        "cache_peer_access corp deny all\n"
        "never_direct allow all\n",
    )
    assert result.config["routes"] == {"default": "corp"}
    # Squid refuses intranet names (never direct, no parent takes them); Outgate sends them on.
    assert lines_with(result, Severity.WARNING, "keeps some destinations from corp") == {2}
    assert result.untranslated == ()


def test_never_direct_for_some_destinations_with_parents_first(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "acl intranet dstdomain .corp.example\n"
        "acl github dstdomain .github.com\n"
        "cache_peer corp.example parent 3128 0\n"
        "always_direct allow intranet\n"
        "never_direct allow github\n",
    )
    settings = settings_of(result, tmp_path)
    assert route(settings, "git.corp.example") == "direct"
    assert route(settings, "api.github.com") == "corp-example"
    # Squid tries the parent first for the rest too, and falls back to direct: reported.
    assert route(settings, "pypi.org") == "corp-example"
    assert lines_with(result, Severity.WARNING, "goes direct when they fail") == {3}


@pytest.mark.parametrize(
    ("lines", "line", "severity", "message"),
    [
        # deny lines that name destinations: Squid's exceptions have no route form
        (["never_direct deny intranet", "never_direct allow all"], 1, Severity.UNTRANSLATED,
         "a deny naming destinations has no route form"),
        (["always_direct deny intranet", "always_direct allow all"], 1, Severity.UNTRANSLATED,
         "a deny naming destinations has no route form"),
        # ACLs that are not destinations
        (["cache_peer_access proxy.corp.example deny intranet",
          "cache_peer_access proxy.corp.example allow partner"], 1, Severity.UNTRANSLATED,
         "before an allow naming others"),
        (["never_direct allow pods"], 1, Severity.UNTRANSLATED, "pods is a src ACL"),
        (["always_direct allow SSL_ports"], 1, Severity.UNTRANSLATED, "SSL_ports is a port ACL"),
        (["always_direct allow !intranet"], 1, Severity.UNTRANSLATED, "negated destination"),
        (["cache_peer_access nosuchpeer allow all"], 1, Severity.UNTRANSLATED,
         "no cache_peer named 'nosuchpeer'"),
        (["never_direct allow all", "never_direct allow intranet"], 2, Severity.NOTE,
         "never reached"),
        # Squid refuses what never_direct holds and no parent's cache_peer_access allows
        (["cache_peer_access proxy.corp.example allow intranet", "never_direct allow all"], 2,
         Severity.WARNING, "no parent takes every destination"),
        # Squid applies the opposite of the last line to what no line matches
        (["always_direct deny intranet"], 1, Severity.WARNING, "opposite of the last line"),
    ],
)  # fmt: skip
def test_routing_lines_that_cannot_be_translated_are_reported(
    tmp_path: Path, lines: list[str], line: int, severity: Severity, message: str
) -> None:
    head = (
        "acl intranet dstdomain .corp.example\n"
        "acl pods src 10.244.0.0/16\n"
        "acl SSL_ports port 443\n"
        "acl partner dstdomain .partner.example\n"
        "cache_peer proxy.corp.example parent 3128 0\n"
    )
    result = import_text(tmp_path, head + "\n".join(lines) + "\n")
    assert line + 5 in lines_with(result, severity, message)
    settings_of(result, tmp_path)  # still a fragment the loader accepts


def test_a_last_always_direct_deny_sends_everything_else_direct(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "acl intranet dstdomain .corp.example\n"
        "cache_peer proxy.corp.example parent 3128 0\n"
        "always_direct deny intranet\n",
    )
    settings = settings_of(result, tmp_path)
    assert route(settings, "pypi.org") == "direct"


@pytest.mark.parametrize(
    ("peer", "message"),
    [
        ("cache_peer p.example parent 3128 0 login=PASS", "login=PASS hands the client's own"),
        ("cache_peer p.example parent 3128 0 login=*:Sup3r-S3cret!", "login=*:... hands"),
        ("cache_peer p.example parent 3128 0 login=NEGOTIATE", "Kerberos"),
        ("cache_peer p.example multicast 3128 3130", "a multicast peer"),
        ("cache_peer p.example parent 3128 0 carp", "carp: Squid spreads requests"),
        ("cache_peer p.example parent 3128 0 sourcehash", "sourcehash: Squid spreads"),
        ("cache_peer p.example parent 3128 0 weighted-round-robin weight=2", "weight"),
        ("cache_peer p.example parent 443 0 originserver", "origin server"),
        ("cache_peer p.example parent 3128 0 tls tls-cert=/c.pem", "no client certificate"),
        ("cache_peer p.example parent 3128 0 tls tls-flags=DONT_VERIFY_PEER", "always verifies"),
        ("cache_peer p.example parent 3128 0 tls sslcapath=/etc/ssl", "one PEM file"),
        ("cache_peer p.example parent http 0", "is not a port"),
        ("cache_peer p.example parent 3128 0 no-such-option=1", "no-such-option: no Outgate"),
    ],
)
def test_cache_peer_options_without_an_outgate_meaning_are_reported(
    tmp_path: Path, peer: str, message: str
) -> None:
    result = import_text(tmp_path, peer + "\nnever_direct allow all\n")
    assert 1 in lines_with(result, Severity.UNTRANSLATED, message) | lines_with(
        result, Severity.WARNING, message
    )
    assert "S3cret" not in result.report() + result.policies_yaml + yaml.safe_dump(result.config)


def test_tls_parents_and_upstream_names(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "cache_peer 2001:db8::7 parent 3128 0 ssl sslcafile=/etc/ca.pem name=direct\n"
        "cache_peer proxy.example parent 3128 0 name=Proxy_Example login=u:p%40ss\n"
        "cache_peer proxy2.example parent 3128 0 name=proxy.example\n"
        "never_direct allow all\n",
    )
    upstreams = result.config["upstreams"]
    assert upstreams[0]["name"] == "parent-direct"  # `direct` means no upstream
    assert upstreams[0]["proxies"] == ["https://[2001:db8::7]:3128"]
    assert upstreams[0]["caBundle"] == "/etc/ca.pem"
    assert [u["name"] for u in upstreams[1:]] == ["proxy-example", "proxy-example-2"]
    assert lines_with(result, Severity.UNTRANSLATED, "URL-escaped: write it decoded") == {2}
    assert "p%40ss" not in result.report()
    settings_of(result, tmp_path)


def test_routing_lines_without_parents_are_reported(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "acl intranet dstdomain .corp.example\n"
        "always_direct allow intranet\n"
        "never_direct allow all\n"
        "dead_peer_timeout 30 seconds\n",
    )
    assert "upstreams" not in result.config and "routes" not in result.config
    assert lines_with(result, Severity.UNTRANSLATED, "no parent proxy is translated") == {3}
    assert lines_with(result, Severity.NOTE, "no parent proxy") >= {2, 4}
