"""`outgate suggest`: policies learnt from audit records allow every observed allowed request
and nothing the records never showed, checked by replaying requests through `explain`; on
records written by a proxy started as the CLI does, and on generated records."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.adoption.suggest import Suggestion, SuggestOptions, suggest
from proxy.config import load_settings
from proxy.core.hosts import IPAddress
from proxy.core.identity import UNKNOWN_WORKLOAD, StaticIdentityIndex, Workload
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import Action, Mode
from proxy.explainer import explain
from tests.adoption.records import (
    BUCKETS,
    OBSERVED,
    SHARDS,
    SOURCES,
    Seen,
    lines_for,
    pod,
    recorded_log,
)
from tests.support.clients import curl
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI
from tests.support.proxyproc import ProxyProcess, outgate_command

StartProxy = Callable[..., ProxyProcess]


class PodIndex:
    """IdentityLookup for the generated records' pods."""

    def __init__(self, workloads: dict[str, Workload]) -> None:
        self.workloads = workloads

    def lookup(self, ip: IPAddress) -> Workload:
        return self.workloads.get(str(ip), UNKNOWN_WORKLOAD)


def engine_from(text: str, *, default: Action = Action.DENY) -> Engine:
    return Engine.compile(
        load_text(text, file="suggested.yaml"), default_action=default, revision=1
    )


def verdicts(engine: Engine, identity: Any, source: str, url: str) -> tuple[str, str | None]:
    """(decision, shadow decision or None) from `explain`, as an operator would see them."""
    _, as_dict = explain(engine, identity, source=source, url=url)
    shadow = as_dict["shadow"]
    return as_dict["decision"]["action"], shadow["action"] if shadow else None


def allowed(records: Iterable[Seen]) -> list[Seen]:
    return [seen for seen in records if seen.outcome == "allow" and not seen.workload.is_unknown]


# Requests no record shows, for each workload: other ports, parents, siblings beyond a
# wildcard's reach, public-suffix neighbours, other workloads' destinations, refused ones.
NEVER_SEEN = [
    ("10.0.1.1", "api.stripe.com:80"),
    ("10.0.1.1", "stripe.com:443"),
    ("10.0.1.1", "http://www.example.org:8080/"),
    ("10.0.1.1", "cdn.shop-assets.example:443"),  # the wildcard never covers its parent
    ("10.0.1.1", "s1.cdn.shop-assets.example:80"),
    ("10.0.1.1", "bucket-7.s3.amazonaws.com:443"),  # no wildcard under a public suffix
    ("10.0.1.1", "203.0.113.11:8443"),
    ("10.0.1.1", "203.0.113.10:443"),
    ("10.0.1.1", "db.corp.example:5432"),  # the CronJob's, not the Deployment's
    ("10.0.2.1", "api.stripe.com:443"),
    ("10.0.2.1", "db.corp.example:5433"),
    ("10.0.3.1", "metadata.google.internal:80"),  # refused by the guard: never suggested
    ("10.0.3.1", "exfil.example:443"),  # denied by policy: left out
    ("10.0.3.1", "api.partner.example:80"),
]


@pytest.fixture(scope="module")
def enforced() -> Suggestion:
    return suggest(recorded_log(), SuggestOptions(mode=Mode.ENFORCE))


def test_generated_log_policies_allow_every_observed_allowed_request(
    enforced: Suggestion,
) -> None:
    engine, identity = engine_from(enforced.to_yaml()), PodIndex(SOURCES)
    for seen in allowed(OBSERVED):
        assert verdicts(engine, identity, seen.source, seen.url) == ("allow", None), seen


@pytest.mark.parametrize(("source", "url"), NEVER_SEEN)
def test_generated_log_policies_allow_nothing_the_log_never_showed(
    enforced: Suggestion, source: str, url: str
) -> None:
    engine, identity = engine_from(enforced.to_yaml()), PodIndex(SOURCES)
    assert verdicts(engine, identity, source, url)[0] == "deny"


def test_names_collapse_only_above_the_threshold_and_never_under_a_public_suffix(
    enforced: Suggestion,
) -> None:
    engine, identity = engine_from(enforced.to_yaml()), PodIndex(SOURCES)
    # Seven shards were seen under cdn.shop-assets.example (threshold 5): a new one is allowed.
    assert verdicts(engine, identity, "10.0.1.1", "s99.cdn.shop-assets.example:443")[0] == "allow"
    (web,) = [w for w in enforced.workloads if w.key.owner_name == "web"]
    names = {name for rule in web.rules for name in rule.fqdns}
    assert "*.cdn.shop-assets.example" in names and not names & set(SHARDS)
    assert set(BUCKETS) <= names  # six buckets, but s3.amazonaws.com is a public suffix
    exact = suggest(recorded_log(), SuggestOptions(wildcard_threshold=8))
    (web_exact,) = [w for w in exact.workloads if w.key.owner_name == "web"]
    assert set(SHARDS) <= {name for rule in web_exact.rules for name in rule.fqdns}


def test_ports_and_tunnel_protocols_are_what_was_seen(enforced: Suggestion) -> None:
    rules = {
        (w.key.owner_name, rule.protocol, rule.ports): set(rule.fqdns) | set(rule.cidrs)
        for w in enforced.workloads
        for rule in w.rules
    }
    assert rules[("report", "postgres", (5432,))] == {"db.corp.example"}
    assert rules[("report", "ssh", (22,))] == {"git.example.net"}
    assert rules[("report", "tcp", (2525,))] == {"smtp.example.net"}
    assert rules[("web", "tls", (80, 443))] == {"www.example.org"}
    assert rules[("web", "tls", (8443,))] == {"203.0.113.10/32"}
    # The internal name reached through a cidr rule keeps exactly its address for the guard.
    assert {"inventory.corp.example", "10.20.3.4/32"} <= rules[("web", "tls", (443,))]


def test_guard_refusals_are_marked_and_unknown_sources_counted(enforced: Suggestion) -> None:
    (etl,) = [w for w in enforced.workloads if w.key.owner_name == "etl"]
    assert etl.guarded == (("metadata.google.internal", 80, 1),)
    assert etl.denied == (("exfil.example", 443, "rule_deny", 1),)
    text = enforced.to_yaml()
    assert "REFUSED BY THE ADDRESS GUARD: metadata.google.internal:80" in text
    assert enforced.unknown_source_requests == 1 and enforced.unreadable_lines == 1
    assert {str(w.key) for w in enforced.workloads} == {
        "data/StatefulSet/etl", "shop/CronJob/report", "shop/Deployment/web",
    }  # fmt: skip


def test_include_denied_adds_what_policy_denied_but_never_guard_refusals() -> None:
    result = suggest(recorded_log(), SuggestOptions(mode=Mode.ENFORCE, include_denied=True))
    engine, identity = engine_from(result.to_yaml()), PodIndex(SOURCES)
    assert verdicts(engine, identity, "10.0.3.1", "exfil.example:443")[0] == "allow"
    assert verdicts(engine, identity, "10.0.3.1", "http://metadata.google.internal/")[0] == "deny"


def test_audit_mode_policies_change_nothing_and_show_in_the_shadow_decision() -> None:
    result = suggest(recorded_log())  # mode audit is the default
    assert "mode: audit" in result.to_yaml()
    # An open cluster during rollout (defaultAction: allow): the audit-mode policies never
    # change the decision; their verdict is the shadow decision.
    engine, identity = engine_from(result.to_yaml(), default=Action.ALLOW), PodIndex(SOURCES)
    for seen in allowed(OBSERVED):
        assert verdicts(engine, identity, seen.source, seen.url) == ("allow", "allow"), seen
    for source, url in NEVER_SEEN:
        assert verdicts(engine, identity, source, url) == ("allow", "deny"), (source, url)


def test_a_larger_generated_log_gives_the_same_policies_as_its_distinct_requests() -> None:
    """Repetition changes counts, never the policies: 40,000 records of 8 distinct requests."""
    web = pod("shop", "Deployment", "web", "web-1")
    distinct = [
        Seen("10.0.1.1", web, name, port)
        for name in ("a.example.com", "b.example.com", "c.example.net")
        for port in (443, 8443)
    ] + [Seen("10.0.1.1", web, "d.example.com", 80, kind="forward")] * 2
    few = suggest([line for seen in distinct for line in lines_for(seen)])
    many_lines = [line for seen in distinct * 2500 for line in lines_for(seen)]
    many = suggest(many_lines)
    assert many.records == 20_000 and len(many_lines) == 40_000
    assert [w.rules for w in many.workloads] == [w.rules for w in few.workloads]


def test_suggest_cli_reads_stdin_and_writes_loadable_yaml(tmp_path: Path) -> None:
    records = b"".join(recorded_log())
    result = subprocess.run(
        [*outgate_command(), "suggest", "--mode", "enforce", "--wildcard-threshold", "3"],
        input=records,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    policies = load_text(result.stdout.decode(), file="stdin.yaml")
    assert {p.name for p in policies} == {"web-egress", "report-egress", "etl-egress"}
    assert b"26 decision records" in result.stderr


# -- records a real proxy wrote ------------------------------------------------------------------


def request_url(record: dict[str, Any]) -> str:
    destination = record["destination"]
    host = destination["domain"] or destination["ip"]
    if record["outgate"]["connection"] == "tunnel":
        return f"{host}:{destination['port']}"
    return f"http://{host}:{destination['port']}{record['url']['path']}"


def test_policies_from_a_recorded_proxy_log_replay_through_explain(
    start_proxy: StartProxy,
    origin: OriginServer,
    tls_origin: OriginServer,
    pki: OriginPKI,
    dns_server: ScriptedDNSServer,
    tmp_path: Path,
) -> None:
    for name in ("origin.test", "api.origin.test"):
        dns_server.addresses(name, "127.0.0.1")
    dns_server.addresses("internal.test", "10.9.9.9")
    proxy = start_proxy(
        policy_allowing("origin.test", "*.origin.test", "internal.test"),
        nameserver=dns_server.nameserver,
    )

    def status(*args: str) -> str:
        return curl("-x", proxy.url, *args, status_only=True).stdout

    assert status(f"http://origin.test:{origin.port}/hello") == "200"
    assert status(f"http://api.origin.test:{origin.port}/hello") == "200"
    tls_url = f"https://origin.test:{tls_origin.port}/hello"
    assert status("--cacert", str(pki.ca_pem), tls_url) == "200"
    assert status(f"http://other.test:{origin.port}/") == "403"  # policy
    assert status(f"http://internal.test:{origin.port}/") == "403"  # guard
    proxy.wait_records(lambda r: r["event"]["action"] == "close", count=5)
    proxy.stop()
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"".join(proxy.raw_stdout))

    out = tmp_path / "suggested.yaml"
    result = subprocess.run(
        [*outgate_command(), "suggest", str(log), "--config", str(proxy.config_path),
         "--mode", "enforce", "-o", str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    (document,) = [d for d in yaml.safe_load_all(text) if d]
    # A static identity: the selector is its labels from the proxy's config.
    assert document["spec"]["podSelector"] == {"matchLabels": {"app": "client"}}
    assert "REFUSED BY THE ADDRESS GUARD: internal.test" in text
    # The origins resolve to loopback, which the guard admits only when the deciding rule lists
    # the address: the suggestion lists exactly the address seen, not the test policy's /8.
    assert "cidr: 127.0.0.1/32" in text and "127.0.0.0/8" not in text

    engine = engine_from(text)
    identity = StaticIdentityIndex(load_settings(proxy.config_path).static_identities)
    decisions = [r for r in proxy.records if r["event"]["action"] == "decision"]
    assert len(decisions) == 5
    for record in decisions:
        expected = "allow" if record["outgate"]["decision"] == "allow" else "deny"
        got, _ = verdicts(engine, identity, record["source"]["ip"], request_url(record))
        assert got == expected, record
    other_port = max(origin.port, tls_origin.port) + 1
    for url in (
        f"http://origin.test:{other_port}/hello",  # another port
        f"http://www.origin.test:{origin.port}/",  # a sibling (two names: under the threshold)
        f"http://other.test:{origin.port}/",
        f"http://internal.test:{origin.port}/",
        f"api.origin.test:{tls_origin.port}",  # api. was seen on the plain origin's port only
    ):
        assert verdicts(engine, identity, "127.0.0.1", url)[0] == "deny", url
    assert verdicts(engine, identity, "127.0.0.1", "http://origin.test/")[0] == "deny"
