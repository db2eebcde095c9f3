"""The policy loader: what it builds from valid YAML, and how it refuses invalid YAML (each issue
names file, document, field path and the fix)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.core.policy.loader import load_paths, load_text, policy_files
from proxy.core.policy.model import (
    DEFAULT_PORTS,
    DEFAULT_PRIORITY,
    Action,
    Inspect,
    Mode,
    PolicyKind,
    PortRange,
    Tier,
    TunnelProtocol,
)
from proxy.errors import ConfigError, ConfigIssue

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "policies" / "examples"
API = "outgate.dev/v1alpha1"


def rule(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "r", "action": "Allow", "to": [{"fqdn": "example.com"}]}
    body.update(overrides)
    return {key: value for key, value in body.items() if value is not None}


def cluster(*rules: dict[str, Any], name: str = "p", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"tier": "admin", "rules": list(rules) or [rule()]}
    body.update(spec)
    return {
        "apiVersion": API,
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": name},
        "spec": {key: value for key, value in body.items() if value is not None},
    }


def namespaced(
    *rules: dict[str, Any], name: str = "p", namespace: str | None = "ns", **spec: Any
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": API,
        "kind": "EgressPolicy",
        "metadata": metadata,
        "spec": {"rules": list(rules) or [rule()], **spec},
    }


def dump(*documents: dict[str, Any]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


def issues_of(text: str, *, file: str = "policies.yaml") -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        load_text(text, file=file)
    return caught.value.issues


# --------------------------------------------------------------------------------------------
# What valid YAML becomes
# --------------------------------------------------------------------------------------------


def test_the_example_policies_load_without_issues() -> None:
    policies = load_paths([EXAMPLES])
    assert {p.ruleset for p in policies} >= {"security-denylist", "payments/payments-api"}


def test_the_design_document_example_builds_the_documented_model() -> None:
    policies = load_paths([EXAMPLES / "payments.yaml"])
    api = next(p for p in policies if p.name == "payments-api")
    assert (api.kind, api.namespace, api.tier, api.mode) == (
        PolicyKind.NAMESPACED,
        "payments",
        Tier.NAMESPACE,
        Mode.ENFORCE,
    )
    assert api.ruleset == "payments/payments-api"
    stripe, ledger, partner = api.rules
    assert stripe.fqdns == ("api.stripe.com",)
    assert stripe.ports == (PortRange(start=443, end=443),)
    assert stripe.protocol is None  # not written: TLS or plain HTTP, by the first bytes
    assert ledger.cidrs == (ipaddress.ip_network("10.20.0.0/16"),)
    assert ledger.protocol is TunnelProtocol.POSTGRES
    assert partner.inspect == Inspect(
        methods=("GET", "POST"),
        paths=("/v2/*",),
        dlp=("aws-access-key", "private-key", "bearer-to-other-host"),
    )


def test_defaults_ports_80_443_no_protocol_mode_enforce_priority_500() -> None:
    (policy,) = load_text(dump(cluster()), file="p.yaml")
    assert policy.priority == DEFAULT_PRIORITY == 500
    assert policy.mode is Mode.ENFORCE
    assert (
        policy.rules[0].ports
        == DEFAULT_PORTS
        == (PortRange(start=80, end=80), PortRange(start=443, end=443))
    )
    assert policy.rules[0].protocol is None
    assert policy.rules[0].inspect is None
    assert policy.subject is None


def test_names_are_normalised_like_request_hosts_and_wildcards_stored_as_suffixes() -> None:
    text = dump(
        cluster(
            rule(
                to=[
                    {"fqdn": "API.Stripe.COM."},
                    {"fqdn": "Bücher.example"},
                    {"fqdn": "*.Stripe.com"},
                    {"fqdn": "api.stripe.com"},
                    {"cidr": "2001:db8::/32"},
                ]
            )
        )
    )
    (policy,) = load_text(text, file="p.yaml")
    (parsed,) = policy.rules
    assert parsed.fqdns == ("api.stripe.com", "xn--bcher-kva.example")
    assert parsed.wildcard_suffixes == ("stripe.com",)
    assert parsed.cidrs == (ipaddress.ip_network("2001:db8::/32"),)


def test_port_ranges_and_the_subject_are_parsed() -> None:
    text = dump(
        cluster(
            rule(ports=[443, {"port": 8000, "endPort": 8100}, {"port": 9000}], protocol="tcp"),
            subject={
                "namespaceSelector": {"matchLabels": {"team": "payments"}},
                "podSelector": {
                    "matchExpressions": [{"key": "app", "operator": "In", "values": ["api"]}]
                },
                "serviceAccounts": ["api"],
                "owners": [{"kind": "Deployment", "name": "api"}],
            },
            priority=0,
            mode="audit",
            tier="baseline",
        )
    )
    (policy,) = load_text(text, file="p.yaml")
    assert policy.rules[0].ports == (
        PortRange(start=443, end=443),
        PortRange(start=8000, end=8100),
        PortRange(start=9000, end=9000),
    )
    assert policy.rules[0].protocol is TunnelProtocol.TCP
    assert (policy.tier, policy.priority, policy.mode) == (Tier.BASELINE, 0, Mode.AUDIT)
    assert policy.subject is not None
    assert str(policy.subject.namespace_selector) == "team=payments"
    assert str(policy.subject.pod_selector) == "app in (api)"
    assert policy.subject.service_accounts == ("api",)
    assert policy.subject.owners == (("Deployment", "api"),)


def test_a_deny_may_name_a_whole_top_level_domain() -> None:
    (policy,) = load_text(dump(cluster(rule(action="Deny", to=[{"fqdn": "*.zip"}]))), file="p.yaml")
    assert policy.rules[0].wildcard_suffixes == ("zip",)


def test_empty_documents_are_skipped_and_documents_are_numbered_from_one() -> None:
    text = (
        "# a comment only\n---\n" + dump(cluster(name="a")) + "---\n---\n" + dump(cluster(name="b"))
    )
    policies = load_text(text, file="p.yaml")
    # The comment before the first `---` is not a document; `---` then `---` is an empty one.
    assert [(p.name, p.origin.document) for p in policies] == [("a", 1), ("b", 3)]


def test_a_kubectl_dump_with_status_and_server_metadata_loads() -> None:
    document = cluster()
    document["metadata"].update(
        {"uid": "1", "resourceVersion": "7", "generation": 2, "labels": {"a": "b"}}
    )
    document["status"] = {}
    assert len(load_text(dump(document), file="p.yaml")) == 1


# --------------------------------------------------------------------------------------------
# Refusals: each names file, document, field path and the fix
# --------------------------------------------------------------------------------------------

REJECTIONS: list[tuple[str, dict[str, Any], str, str]] = [
    # fqdn patterns
    ("a bare *", cluster(rule(to=[{"fqdn": "*"}])), "spec.rules[0].to[0].fqdn", '"*.example.com"'),
    (
        "* inside a label (foo*.com)",
        cluster(rule(to=[{"fqdn": "foo*.example.com"}])),
        "spec.rules[0].to[0].fqdn",
        '"*.example.com"',
    ),
    (
        "* as a label prefix (*foo.com)",
        cluster(rule(to=[{"fqdn": "*foo.com"}])),
        "spec.rules[0].to[0].fqdn",
        "list each name",
    ),
    (
        "more than one * (*.*.com)",
        cluster(rule(to=[{"fqdn": "*.*.example.com"}])),
        "spec.rules[0].to[0].fqdn",
        '"*.example.com"',
    ),
    (
        "* after the first label (a.*.com)",
        cluster(rule(to=[{"fqdn": "a.*.example.com"}])),
        "spec.rules[0].to[0].fqdn",
        '"*.example.com"',
    ),
    (
        "an Allow of a whole TLD (*.com)",
        cluster(rule(to=[{"fqdn": "*.com"}])),
        "spec.rules[0].to[0].fqdn",
        '"*.example.com"',
    ),
    (
        "an IPv4 address in fqdn",
        cluster(rule(to=[{"fqdn": "203.0.113.7"}])),
        "spec.rules[0].to[0].fqdn",
        "cidr: 203.0.113.7/32",
    ),
    (
        "an IPv6 address in fqdn",
        cluster(rule(to=[{"fqdn": "[2001:db8::1]"}])),
        "spec.rules[0].to[0].fqdn",
        "cidr: 2001:db8::1/128",
    ),
    (
        "a numeric non-canonical IPv4 in fqdn",
        cluster(rule(to=[{"fqdn": "0x7f.1"}])),
        "spec.rules[0].to[0].fqdn",
        "DNS name",
    ),
    (
        "an invalid name",
        cluster(rule(to=[{"fqdn": "bad name.com"}])),
        "spec.rules[0].to[0].fqdn",
        "DNS name",
    ),
    # destinations
    (
        "cidr with host bits set",
        cluster(rule(to=[{"cidr": "10.20.1.0/16"}])),
        "spec.rules[0].to[0].cidr",
        "write the network 10.20.0.0/16, or 10.20.1.0/32",
    ),
    (
        "cidr that is not one",
        cluster(rule(to=[{"cidr": "10.0.0.0/33"}])),
        "spec.rules[0].to[0].cidr",
        "address/prefix",
    ),
    (
        "fqdn and cidr in one entry",
        cluster(rule(to=[{"fqdn": "a.com", "cidr": "10.0.0.0/8"}])),
        "spec.rules[0].to[0]",
        "one destination per entry",
    ),
    ("empty to", cluster(rule(to=[])), "spec.rules[0].to", "list destinations"),
    (
        "unknown key in to",
        cluster(rule(to=[{"fqnd": "a.com"}])),
        "spec.rules[0].to[0].fqnd",
        "did you mean 'fqdn'?",
    ),
    # ports
    ("port above 65535", cluster(rule(ports=[70000])), "spec.rules[0].ports[0]", "1 to 65535"),
    ("port zero", cluster(rule(ports=[0])), "spec.rules[0].ports[0]", "1 to 65535"),
    (
        "quoted port",
        cluster(rule(ports=["443"])),
        "spec.rules[0].ports[0]",
        "write 443 without quotes",
    ),
    (
        "range as text",
        cluster(rule(ports=["8000-8100"])),
        "spec.rules[0].ports[0]",
        "{port: 8000, endPort: 8100}",
    ),
    # A bad port without endPort is one issue, at the field the user wrote (issue 14, defect 5).
    (
        "port above 65535 in a mapping",
        cluster(rule(ports=[{"port": 70000}])),
        "spec.rules[0].ports[0].port",
        "1 to 65535",
    ),
    (
        "endPort above 65535",
        cluster(rule(ports=[{"port": 8000, "endPort": 70000}])),
        "spec.rules[0].ports[0].endPort",
        "1 to 65535",
    ),
    (
        "endPort below port",
        cluster(rule(ports=[{"port": 9000, "endPort": 8000}])),
        "spec.rules[0].ports[0].endPort",
        "{port: 8000, endPort: 9000}",
    ),
    ("empty ports", cluster(rule(ports=[])), "spec.rules[0].ports", "omit ports for [80, 443]"),
    # rule fields
    (
        "unknown rule key",
        cluster(rule(acton="Allow")),
        "spec.rules[0].acton",
        "did you mean 'action'?",
    ),
    (
        "action in the wrong case",
        cluster(rule(action="allow")),
        "spec.rules[0].action",
        "did you mean 'Allow'?",
    ),
    (
        "protocol in the wrong case",
        cluster(rule(protocol="TLS")),
        "spec.rules[0].protocol",
        "did you mean 'tls'?",
    ),
    (
        "duplicate rule names",
        cluster(rule(name="same"), rule(name="same")),
        "spec.rules[1].name",
        "unique name",
    ),
    (
        "rule name not DNS-1123",
        cluster(rule(name="Allow_Stripe")),
        "spec.rules[0].name",
        "lowercase",
    ),
    ("empty rules", cluster(rules=[]), "spec.rules", "add at least one rule"),
    (
        "Pass in an EgressPolicy",
        namespaced(rule(action="Pass")),
        "spec.rules[0].action",
        "use Allow or Deny",
    ),
    # inspect
    (
        "unknown DLP detector",
        cluster(rule(inspect={"dlp": ["aws-key"]})),
        "spec.rules[0].inspect.dlp[0]",
        "did you mean 'aws-access-key'?",
    ),
    (
        "lowercase method",
        cluster(rule(inspect={"methods": ["get"]})),
        "spec.rules[0].inspect.methods[0]",
        "did you mean 'GET'?",
    ),
    (
        "path without a leading slash",
        cluster(rule(inspect={"paths": ["v2/*"]})),
        "spec.rules[0].inspect.paths[0]",
        'start with "/"',
    ),
    (
        "inspect on a Deny",
        cluster(rule(action="Deny", inspect={})),
        "spec.rules[0].inspect",
        "action: Allow",
    ),
    (
        "inspect on a postgres tunnel",
        cluster(rule(protocol="postgres", inspect={})),
        "spec.rules[0].inspect",
        "protocol: tls",
    ),
    # policy fields
    (
        "EgressPolicy without a namespace",
        namespaced(namespace=None),
        "metadata.namespace",
        "add metadata.namespace",
    ),
    (
        "ClusterEgressPolicy with a namespace",
        {**cluster(), "metadata": {"name": "p", "namespace": "ns"}},
        "metadata.namespace",
        "remove metadata.namespace",
    ),
    ("ClusterEgressPolicy without a tier", cluster(tier=None), "spec.tier", "tier: baseline"),
    ("tier misspelled", cluster(tier="admn"), "spec.tier", "did you mean 'admin'?"),
    ("priority out of range", cluster(priority=1001), "spec.priority", "0 (first) to 1000"),
    ("unknown mode", cluster(mode="audit-only"), "spec.mode", "did you mean 'audit'?"),
    (
        "tier in an EgressPolicy",
        namespaced(tier="admin"),
        "spec.tier",
        "always in the namespace tier",
    ),
    (
        "podSelector in a ClusterEgressPolicy",
        cluster(podSelector={}),
        "spec.podSelector",
        "subject: {podSelector",
    ),
    ("unknown spec key", cluster(rulez=[]), "spec.rulez", "did you mean 'rules'?"),
    (
        "bad metadata.name",
        {**cluster(), "metadata": {"name": "Bad_Name"}},
        "metadata.name",
        "lowercase",
    ),
    (
        "kind misspelled",
        {**cluster(), "kind": "ClusterEgresPolicy"},
        "kind",
        "did you mean 'ClusterEgressPolicy'?",
    ),
    ("wrong apiVersion", {**cluster(), "apiVersion": "outgate.dev/v1"}, "apiVersion", API),
    (
        "owner kind in the wrong case",
        cluster(subject={"owners": [{"kind": "deployment", "name": "api"}]}),
        "spec.subject.owners[0].kind",
        "did you mean 'Deployment'?",
    ),
    (
        "service account with a namespace",
        cluster(subject={"serviceAccounts": ["ns:api"]}),
        "spec.subject.serviceAccounts[0]",
        "name only",
    ),
    (
        "bad matchExpressions operator",
        cluster(
            subject={
                "podSelector": {
                    "matchExpressions": [{"key": "app", "operator": "Equals", "values": ["a"]}]
                }
            }
        ),
        "spec.subject.podSelector.matchExpressions[0].operator",
        "In, NotIn, Exists, DoesNotExist",
    ),
]


@pytest.mark.parametrize(
    ("case", "document", "path", "fix"), REJECTIONS, ids=[c[0] for c in REJECTIONS]
)
def test_invalid_policy_is_refused_with_file_document_path_and_fix(
    case: str, document: dict[str, Any], path: str, fix: str
) -> None:
    # The bad document is the second one in the file, after a valid policy.
    issues = issues_of(dump(cluster(name="fine"), document))
    assert [issue.path for issue in issues] == [path], [i.render() for i in issues]
    (issue,) = issues
    assert issue.file == "policies.yaml"
    assert issue.document == 2
    assert fix in issue.fix, issue.render()


def test_every_issue_in_a_file_is_reported_not_just_the_first() -> None:
    issues = issues_of(
        dump(
            cluster(rule(to=[{"fqdn": "*"}], ports=[0])),
            namespaced(namespace=None),
        )
    )
    assert [(i.document, i.path) for i in issues] == [
        (1, "spec.rules[0].to[0].fqdn"),
        (1, "spec.rules[0].ports[0]"),
        (2, "metadata.namespace"),
    ]


def test_a_yaml_syntax_error_names_the_line() -> None:
    text = dump(cluster()) + "---\napiVersion: outgate.dev/v1alpha1\nkind: a: b\n"
    assert text.splitlines()[13] == "kind: a: b"
    (issue,) = issues_of(text)
    assert issue.document == 2
    assert "line 14" in issue.message, issue.message
    assert issue.path == ""
    assert "correct the YAML" in issue.fix


def test_an_unquoted_wildcard_gets_a_quoting_fix() -> None:
    text = dump(cluster()).replace("fqdn: example.com", "fqdn: *.example.com")
    (issue,) = issues_of(text)
    assert "YAML syntax error" in issue.message
    assert 'quote names that start with "*"' in issue.fix


def test_a_duplicate_yaml_key_is_refused_rather_than_silently_keeping_the_last() -> None:
    text = (
        "apiVersion: outgate.dev/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {name: p}\n"
        "spec:\n  tier: admin\n  rules:\n    - name: r\n      action: Allow\n"
        "      to: [{fqdn: a.example.com}]\n      to: [{fqdn: b.example.com}]\n"
    )
    (issue,) = issues_of(text)
    assert "duplicate key 'to'" in issue.message
    assert "line 10" in issue.message
    assert "remove one of the two keys" in issue.fix


def test_a_document_that_is_not_a_mapping_is_refused() -> None:
    (issue,) = issues_of("- just\n- a list\n")
    assert issue.document == 1
    assert "must be a mapping" in issue.message


def test_duplicate_policy_in_one_text_is_refused() -> None:
    (issue,) = issues_of(dump(cluster(name="same"), cluster(name="same")))
    assert (issue.document, issue.path) == (2, "metadata.name")
    assert "already defined in policies.yaml (document 1)" in issue.message


# --------------------------------------------------------------------------------------------
# Files and directories
# --------------------------------------------------------------------------------------------


def test_a_directory_is_read_one_level_deep_in_name_order_skipping_hidden_entries(
    tmp_path: Path,
) -> None:
    (tmp_path / "b.yml").write_text(dump(cluster(name="from-b")))
    (tmp_path / "a.yaml").write_text(dump(cluster(name="from-a")))
    (tmp_path / "notes.txt").write_text("not yaml: [")
    (tmp_path / ".hidden.yaml").write_text(dump(cluster(name="hidden")))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text(dump(cluster(name="nested")))
    assert [p.name for p in load_paths([tmp_path])] == ["from-a", "from-b"]


def test_a_file_named_explicitly_is_read_once_even_if_its_directory_is_listed_too(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(dump(cluster(name="a")))
    files, issues = policy_files([tmp_path, path])
    assert (files, issues) == ([path], [])
    assert len(load_paths([tmp_path, path])) == 1


def test_a_missing_path_is_an_issue(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_paths([tmp_path / "nope"])
    (issue,) = caught.value.issues
    assert issue.file == str(tmp_path / "nope")
    assert "does not exist" in issue.message


def test_duplicate_policy_across_files_names_both_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(dump(namespaced(name="same")))
    (tmp_path / "b.yaml").write_text(dump(cluster(name="other"), namespaced(name="same")))
    with pytest.raises(ConfigError) as caught:
        load_paths([tmp_path])
    (issue,) = caught.value.issues
    assert (issue.file, issue.document, issue.path) == (
        str(tmp_path / "b.yaml"),
        2,
        "metadata.name",
    )
    assert (
        f"EgressPolicy 'ns/same' is already defined in {tmp_path / 'a.yaml'} (document 1)"
        in issue.message
    )


def test_issues_from_several_files_are_raised_together(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(dump(cluster(rule(ports=[0]))))
    (tmp_path / "b.yaml").write_text("kind: [\n")
    with pytest.raises(ConfigError) as caught:
        load_paths([tmp_path])
    assert [Path(issue.file).name for issue in caught.value.issues] == ["a.yaml", "b.yaml"]


def test_a_same_named_cluster_and_namespaced_policy_do_not_collide() -> None:
    policies = load_text(dump(cluster(name="same"), namespaced(name="same")), file="p.yaml")
    assert [p.kind for p in policies] == [PolicyKind.CLUSTER, PolicyKind.NAMESPACED]
    assert policies[0].rules[0].action is Action.ALLOW
