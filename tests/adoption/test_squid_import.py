"""`outgate import-squid`: Squid configurations translate to policies that decide as Squid
intended, load with the real loader, and every line that cannot be translated is reported with
its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.adoption.squid_import import (
    ImportOptions,
    ImportResult,
    Severity,
    _RegexError,
    import_squid,
    regex_to_names,
)
from proxy.config import settings_from_mapping
from proxy.core.hosts import parse_host
from proxy.core.identity import UNKNOWN_WORKLOAD, StaticIdentityIndex, Workload
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import Action, Destination, Mode
from proxy.errors import Reason
from proxy.explainer import explain
from tests.adoption.helpers import DATA, POD, engine_for, import_text, line_of, outgate

GUIDE = DATA / "k8s-egress-guide" / "squid.conf"
REALISTIC = DATA / "realistic" / "squid.conf"


def static_index(result: ImportResult, tmp_path: Path) -> StaticIdentityIndex:
    settings = settings_from_mapping(result.config, file="fragment.yaml", base_dir=tmp_path)
    return StaticIdentityIndex(settings.static_identities)


def decide(engine: Engine, workload: Workload, host: str, port: int) -> str:
    parsed = parse_host(host)
    return str(engine.decide(workload, Destination(host=parsed, port=port, ip=parsed.ip)).action)


def replay(engine: Engine, index: StaticIdentityIndex, source: str, url: str) -> str:
    _, as_dict = explain(engine, index, source=source, url=url)
    decision: dict[str, str] = as_dict["decision"]  # type: ignore[assignment]
    return decision["action"]


# -- the Kubernetes egress guides' configuration -----------------------------------------------

# (host, port, what Squid's configuration means for a pod)
GUIDE_TABLE = [
    ("github.com", 443, "allow"),  # ".github.com" covers the apex too
    ("api.github.com", 443, "allow"),
    ("codeload.github.com", 443, "allow"),
    ("github.com", 80, "allow"),  # plain HTTP: no port ACL in the configuration
    ("storage.googleapis.com", 443, "allow"),
    ("googleapis.com", 443, "allow"),
    ("gcr.io", 443, "allow"),
    ("eu.gcr.io", 443, "allow"),
    ("us.gcr.io", 443, "allow"),
    ("api.github.com", 22, "allow"),  # the hole the import reports: no CONNECT port restriction
    ("raw.githubusercontent.com", 443, "deny"),
    ("github.com.attacker.example", 443, "deny"),
    ("evilgithub.com", 443, "deny"),
    ("gcr.io.attacker.example", 443, "deny"),
    ("pypi.org", 443, "deny"),
    ("140.82.112.3", 443, "deny"),  # an IP literal: never matched by name (no reverse DNS)
]


@pytest.mark.parametrize(("host", "port", "expected"), GUIDE_TABLE)
def test_guide_config_for_pods_decides_as_squid_intended(
    host: str, port: int, expected: str
) -> None:
    result = import_squid(GUIDE, ImportOptions(cluster_sources=frozenset({"localnet"})))
    engine = engine_for(result)
    assert decide(engine, POD, host, port) == expected
    # A source outside localnet reaches nothing: Squid's `http_access deny all`.
    assert decide(engine, UNKNOWN_WORKLOAD, host, port) == "deny"


def test_guide_config_reports_the_missing_connect_port_restriction() -> None:
    result = import_squid(GUIDE, ImportOptions(cluster_sources=frozenset({"localnet"})))
    assert result.untranslated == ()
    allow_line = line_of(GUIDE, "http_access allow localnet allowed_domains")
    holes = [f for f in result.warnings if "deny CONNECT !SSL_ports" in f.message]
    assert len(holes) == 1
    assert holes[0].location is not None and holes[0].location.line == allow_line
    assert any("reverse DNS" in f.message for f in result.warnings)
    assert result.config["listen"] == "0.0.0.0:3128"
    assert result.config["defaultAction"] == "deny"


def test_guide_config_with_static_sources_decides_by_source_address(tmp_path: Path) -> None:
    result = import_squid(GUIDE)
    engine, index = engine_for(result), static_index(result, tmp_path)
    for host, port, expected in GUIDE_TABLE:
        scheme = "http" if port == 80 else "https"
        url = f"{scheme}://{host}:{port}/"
        for source in ("10.1.2.3", "172.20.0.9", "192.168.7.7"):  # each localnet range
            assert replay(engine, index, source, url) == expected, (source, url)
        assert replay(engine, index, "198.51.100.20", url) == "deny"  # not in localnet


def test_audit_mode_import_changes_no_decision_and_shadows_squids(tmp_path: Path) -> None:
    result = import_squid(
        GUIDE, ImportOptions(cluster_sources=frozenset({"localnet"}), mode=Mode.AUDIT)
    )
    # The trial before a cut-over (docs/migrating-from-squid.md): an open proxy (defaultAction:
    # allow) runs the imported set in audit mode. Nothing is refused; a request an imported rule
    # decides carries that verdict as its shadow decision, and one no rule matches has reason
    # default_allow: Squid's `deny all` would have refused it.
    policies = load_text(result.policies_yaml, file="imported.yaml")
    engine = Engine.compile(policies, default_action=Action.ALLOW, revision=1)
    for host, port, expected in GUIDE_TABLE:
        parsed = parse_host(host)
        decision = engine.decide(POD, Destination(host=parsed, port=port, ip=parsed.ip))
        assert str(decision.action) == "allow"
        if decision.shadow is not None:
            squid_would = str(decision.shadow.action)
        else:
            squid_would = "deny" if decision.reason is Reason.DEFAULT_ALLOW else "allow"
        assert squid_would == expected, (host, port)


def test_import_squid_cli_output_passes_check_config(tmp_path: Path) -> None:
    result = outgate("import-squid", str(GUIDE), "--cluster-src", "localnet")
    assert result.returncode == 0, result.stderr
    assert "deny CONNECT !SSL_ports" in result.stderr
    policies = tmp_path / "policies.yaml"
    policies.write_text(result.stdout)
    checked = outgate("check-config", str(policies))
    assert checked.returncode == 0, checked.stderr
    assert "1 policies, 1 rules" in checked.stdout


@pytest.mark.parametrize(
    ("line", "expected"), [("/etc/hosts.squid", "/etc/hosts.squid"), ("none", None)]
)
def test_hosts_file_becomes_dns_hosts_file(tmp_path: Path, line: str, expected: str | None) -> None:
    conf = tmp_path / "squid.conf"
    conf.write_text(f"http_port 3128\nhosts_file {line}\nhttp_access deny all\n")
    result = import_squid(conf)
    assert result.config["dns"] == {"hostsFile": expected}
    assert all(f.location is None or f.location.line != 2 for f in result.findings)


# -- a realistic configuration -------------------------------------------------------------------

# Directives the importer translates; every other directive line must be a finding.
TRANSLATED = {
    "acl", "http_access", "include", "http_port", "dns_nameservers", "connect_timeout",
    "shutdown_lifetime", "access_log",
}  # fmt: skip


def realistic() -> ImportResult:
    return import_squid(REALISTIC)


def test_realistic_config_follows_includes_and_value_files() -> None:
    result = realistic()
    assert result.files == ("squid.conf", "conf.d/10-destinations.conf", "conf.d/20-regex.conf")
    assert "wiki.partner.example" in result.policies_yaml  # from the quoted value file
    assert "'*.jfrog.io'" in result.policies_yaml  # a regex that is a set of names


def test_realistic_config_reports_every_untranslatable_line_by_number() -> None:
    result = realistic()
    conf_d = REALISTIC.parent / "conf.d" / "20-regex.conf"
    expected = {
        ("squid.conf", line_of(REALISTIC, "http_access deny PURGE")),
        ("squid.conf", line_of(REALISTIC, "http_access allow localnet office_hours saas_apps")),
        ("squid.conf", line_of(REALISTIC, "http_access allow localnet tracker_regex")),
        ("squid.conf", line_of(REALISTIC, "http_access allow localnet", whole=True)),
        ("conf.d/20-regex.conf", line_of(conf_d, "acl tracker_regex")),
        ("conf.d/20-regex.conf", line_of(conf_d, "acl office_hours")),
    }
    found = {(f.location.file, f.location.line) for f in result.untranslated if f.location}
    assert found == expected
    assert all(f.location is not None for f in result.untranslated)
    # The rest is never dropped silently either: every other directive is a finding too.
    located = {(f.location.file, f.location.line) for f in result.findings if f.location}
    for path in (REALISTIC, *sorted((REALISTIC.parent / "conf.d").glob("*.conf"))):
        label = str(path.relative_to(REALISTIC.parent))
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            words = line.split("#")[0].split()
            if words and words[0] not in TRANSLATED:
                assert (label, number) in located, f"{label}:{number} {line!r} is not reported"
    unused = [f for f in result.findings if "curl_clients" in f.message]
    assert len(unused) == 1 and unused[0].severity is Severity.NOTE
    denied_purge = next(f for f in result.untranslated if "PURGE" in f.message)
    assert "NOT enforced" in denied_purge.message


def test_realistic_config_exit_code_and_check_config(tmp_path: Path) -> None:
    policies, fragment = tmp_path / "policies.yaml", tmp_path / "fragment.yaml"
    result = outgate(
        "import-squid", str(REALISTIC), "-o", str(policies), "--config-out", str(fragment)
    )
    assert result.returncode == 3, result.stderr  # written, with untranslated lines
    assert f"squid.conf:{line_of(REALISTIC, 'http_access deny PURGE')}: untranslated" in (
        result.stderr
    )
    config = yaml.safe_load(fragment.read_text())
    config["policies"] = {"paths": ["policies.yaml"]}
    config["audit"]["squidOutput"] = "access.log"
    (tmp_path / "outgate.yaml").write_text(yaml.safe_dump(config))
    checked = outgate("check-config", str(tmp_path / "outgate.yaml"))
    assert checked.returncode == 0, checked.stderr
    assert "config valid" in checked.stdout


# (source, url, decision) for the realistic configuration's static identities.
REALISTIC_TABLE = [
    ("192.168.50.7", "https://pypi.org/", "allow"),  # build_vms package_mirrors
    ("192.168.50.7", "http://deb.debian.org/", "allow"),
    ("192.168.50.7", "http://pypi.org:8443/simple/", "allow"),  # Safe_ports 1025-65535
    ("192.168.50.7", "pypi.org:22", "deny"),  # deny !Safe_ports
    ("192.168.60.15", "https://files.pythonhosted.org/", "allow"),  # the address range
    ("192.168.60.21", "https://pypi.org/", "deny"),  # just outside the range
    ("192.168.50.7", "https://artifacts.corp.example/", "allow"),  # the regex ACL
    ("192.168.50.7", "https://eu.jfrog.io/", "allow"),
    ("192.168.50.7", "https://jfrog.io/", "deny"),  # \.jfrog\.io$ needs a label before it
    ("10.2.3.4", "https://wiki.partner.example/", "allow"),  # localnet corp_sites (value file)
    ("10.2.3.4", "https://git.corp.example/", "allow"),
    ("10.2.3.4", "https://pastebin.com/", "deny"),  # deny blocked_sites comes first
    ("192.168.50.7", "https://x.pastebin.com/", "deny"),
    ("10.2.3.4", "https://203.0.113.7/", "deny"),
    ("10.2.3.4", "https://127.0.0.1/", "deny"),  # deny to_localhost
    # Squid allows these through lines the importer reports as untranslated (office_hours,
    # `allow localnet`): the imported policy denies them, never the other way round.
    ("10.2.3.4", "https://app.slack.com/", "deny"),
    ("10.2.3.4", "https://pypi.org/", "deny"),
]


@pytest.mark.parametrize(("source", "url", "expected"), REALISTIC_TABLE)
def test_realistic_config_decisions(source: str, url: str, expected: str, tmp_path: Path) -> None:
    result = realistic()
    assert replay(engine_for(result), static_index(result, tmp_path), source, url) == expected


# -- translation rules, one at a time --------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "exact", "wildcards"),
    [
        (r"^(www\.)?example\.com$", {"example.com", "www.example.com"}, set()),
        (r"\.example\.com$", set(), {"example.com"}),
        (r"(^|\.)example\.com$", {"example.com"}, {"example.com"}),
        (r"^.*\.example\.com$", set(), {"example.com"}),
        (r"^(.+\.)?example\.com$", {"example.com"}, {"example.com"}),
        (r"^api\.(eu|us)\.example\.com$", {"api.eu.example.com", "api.us.example.com"}, set()),
        (r"^[ab]\.example\.com$", {"a.example.com", "b.example.com"}, set()),
        (r"^(?:Login)\.Example\.com$", {"login.example.com"}, set()),
    ],
)
def test_regexes_that_are_sets_of_names_translate(
    pattern: str, exact: set[str], wildcards: set[str]
) -> None:
    names = regex_to_names(pattern)
    assert (set(names.exact), set(names.wildcards)) == (exact, wildcards)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"example\.com$", "ending in"),  # also matches attackerexample.com
        (r"^example\.com", "anchored at the end"),  # also matches example.com.attacker.example
        (r"^www.example.com$", "unescaped '.'"),
        (r"^[a-z]+\.example\.com$", "range of characters"),
        (r"^\d+\.example\.com$", "character class"),
        (r"^(a|b)*\.example\.com$", "repeats"),
        (r"(ads|tracking)", "anchored at the end"),
    ],
)
def test_regexes_that_are_not_sets_of_names_are_refused_with_the_reason(
    pattern: str, why: str
) -> None:
    with pytest.raises(_RegexError, match=why):
        regex_to_names(pattern)


def test_deny_outside_a_whitelist_limits_the_allows_after_it(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "acl pods src 10.0.0.0/8\n"
        "acl whitelist dstdomain .example.com\n"
        "acl both dstdomain .example.com .example.org\n"
        "http_access deny !whitelist\n"
        "http_access allow pods both\n"
        "http_access deny all\n",
        cluster_sources=frozenset({"pods"}),
    )
    engine = engine_for(result)
    assert decide(engine, POD, "www.example.com", 443) == "allow"
    assert decide(engine, POD, "www.example.org", 443) == "deny"
    assert result.untranslated == ()


def test_deny_of_a_source_removes_it_from_later_allows(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "acl office src 10.0.0.0/8\n"
        "acl quarantined src 10.9.0.0/16\n"
        "acl sites dstdomain api.example.com\n"
        "http_access deny quarantined\n"
        "http_access allow office sites\n"
        "http_access deny all\n",
    )
    engine, index = engine_for(result), static_index(result, tmp_path)
    assert replay(engine, index, "10.1.1.1", "https://api.example.com/") == "allow"
    assert replay(engine, index, "10.9.1.1", "https://api.example.com/") == "deny"


def test_a_last_line_deny_warns_that_squid_allows_the_rest(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "acl bad dstdomain .bad.example\nhttp_access allow all bad\nhttp_access deny bad\n",
    )
    assert any("opposite of the last line" in f.message for f in result.warnings)


def test_lines_after_deny_all_are_reported_unreachable(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "acl sites dstdomain a.example\nhttp_access deny all\nhttp_access allow sites\n",
    )
    (unreachable,) = [f for f in result.findings if "never reached" in f.message]
    assert unreachable.location is not None and unreachable.location.line == 3
    assert result.policy_count == 0


def test_missing_and_self_including_includes_are_reported(tmp_path: Path) -> None:
    (tmp_path / "loop.conf").write_text("include loop.conf\n")
    result = import_text(tmp_path, "include loop.conf\ninclude nothing/*.conf\n")
    messages = [f.render() for f in result.untranslated]
    assert any("loop.conf:1" in m and "includes itself" in m for m in messages)
    assert any("squid.conf:2" in m and "matches no file" in m for m in messages)


def test_undefined_acls_ip_literals_tlds_and_shared_suffixes_are_reported(tmp_path: Path) -> None:
    result = import_text(
        tmp_path,
        "acl literal dstdomain 203.0.113.9 api.example.com\n"
        "acl everything_com dstdomain .com\n"
        "acl buckets dstdomain .s3.amazonaws.com\n"
        "http_access allow literal\n"
        "http_access allow nosuchacl\n"
        "http_access allow everything_com\n"
        "http_access allow buckets\n"
        "http_access deny all\n",
    )
    by_line: dict[int, str] = {}
    for finding in result.findings:
        if finding.location is not None:
            by_line[finding.location.line] = (
                by_line.get(finding.location.line, "") + finding.message
            )
    assert "not defined" in by_line[5]
    assert "top-level domain" in by_line[6]
    assert "IP literals" in by_line[1]
    assert "public suffix" in by_line[3]
    engine = engine_for(result)
    assert decide(engine, UNKNOWN_WORKLOAD, "203.0.113.9", 443) == "allow"
    assert decide(engine, UNKNOWN_WORKLOAD, "api.example.com", 443) == "allow"
    assert decide(engine, UNKNOWN_WORKLOAD, "example.com", 443) == "deny"
