"""Workloads, label selectors, static identities and the IP -> workload index (pure tables)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from proxy.core.identity import (
    MATCH_ALL,
    NAMESPACE_NAME_LABEL,
    UNKNOWN_WORKLOAD,
    FrozenLabels,
    IssueCollector,
    LabelSelector,
    StaticIdentity,
    StaticIdentityIndex,
    Workload,
    WorkloadKind,
    parse_label_selector,
    parse_static_identities,
)
from proxy.errors import ConfigError


def _selector(raw: object) -> tuple[LabelSelector, list[str]]:
    issues = IssueCollector(file="t.yaml", document=1)
    selector = parse_label_selector(raw, issues, "spec.podSelector")
    return selector, [f"{issue.path}: {issue.message} -- {issue.fix}" for issue in issues.issues]


LABELS = {"app": "api", "tier": "web", "track": "stable"}

SELECTOR_CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("empty selector matches everything", {}, True),
    ("matchLabels all equal", {"matchLabels": {"app": "api", "tier": "web"}}, True),
    ("matchLabels one differs", {"matchLabels": {"app": "api", "tier": "db"}}, False),
    ("matchLabels key absent", {"matchLabels": {"team": "x"}}, False),
    (
        "In with the value",
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["api", "x"]}]},
        True,
    ),
    (
        "In without the value",
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["x"]}]},
        False,
    ),
    (
        "In on an absent key",
        {"matchExpressions": [{"key": "nope", "operator": "In", "values": ["x"]}]},
        False,
    ),
    (
        "NotIn with the value",
        {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["api"]}]},
        False,
    ),
    (
        "NotIn with another value",
        {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["x"]}]},
        True,
    ),
    (
        "NotIn on an absent key matches",
        {"matchExpressions": [{"key": "nope", "operator": "NotIn", "values": ["x"]}]},
        True,
    ),
    ("Exists present", {"matchExpressions": [{"key": "track", "operator": "Exists"}]}, True),
    ("Exists absent", {"matchExpressions": [{"key": "canary", "operator": "Exists"}]}, False),
    (
        "DoesNotExist absent matches",
        {"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]},
        True,
    ),
    (
        "DoesNotExist present",
        {"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]},
        False,
    ),
    (
        "matchLabels AND matchExpressions both hold",
        {
            "matchLabels": {"app": "api"},
            "matchExpressions": [{"key": "track", "operator": "In", "values": ["stable"]}],
        },
        True,
    ),
    (
        "matchLabels holds but an expression fails",
        {
            "matchLabels": {"app": "api"},
            "matchExpressions": [{"key": "track", "operator": "In", "values": ["canary"]}],
        },
        False,
    ),
]


@pytest.mark.parametrize(
    ("case", "raw", "expected"), SELECTOR_CASES, ids=[c[0] for c in SELECTOR_CASES]
)
def test_label_selector_follows_kubernetes_semantics(
    case: str, raw: dict[str, Any], expected: bool
) -> None:
    selector, issues = _selector(raw)
    assert issues == []
    assert selector.matches(LABELS) is expected


SELECTOR_ERRORS: list[tuple[str, object, str, str]] = [
    (
        "unknown operator with a suggestion",
        {"matchExpressions": [{"key": "a", "operator": "in", "values": ["x"]}]},
        "spec.podSelector.matchExpressions[0].operator",
        "did you mean 'In'?",
    ),
    (
        "In without values",
        {"matchExpressions": [{"key": "a", "operator": "In"}]},
        "spec.podSelector.matchExpressions[0].values",
        "add values",
    ),
    (
        "Exists with values",
        {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
        "spec.podSelector.matchExpressions[0].values",
        "remove values",
    ),
    (
        "unknown key in a selector",
        {"matchLabel": {"a": "b"}},
        "spec.podSelector.matchLabel",
        "did you mean 'matchLabels'?",
    ),
    (
        "non-string label value",
        {"matchLabels": {"version": 2}},
        "spec.podSelector.matchLabels.version",
        'quote it: version: "2"',
    ),
    (
        "bad label key",
        {"matchLabels": {"-bad": "x"}},
        'spec.podSelector.matchLabels["-bad"]',
        "prefix/",
    ),
    ("null selector", None, "spec.podSelector", "write {} to select everything"),
]


@pytest.mark.parametrize(
    ("case", "raw", "path", "fix"), SELECTOR_ERRORS, ids=[c[0] for c in SELECTOR_ERRORS]
)
def test_label_selector_parse_errors_name_the_field_and_the_fix(
    case: str, raw: object, path: str, fix: str
) -> None:
    _, issues = _selector(raw)
    assert len(issues) == 1, issues
    assert issues[0].startswith(f"{path}:")
    assert fix in issues[0]


def test_label_selector_renders_in_kubectl_syntax() -> None:
    selector, _ = _selector(
        {
            "matchLabels": {"app": "api"},
            "matchExpressions": [
                {"key": "t", "operator": "In", "values": ["a", "b"]},
                {"key": "c", "operator": "DoesNotExist"},
            ],
        }
    )
    assert str(selector) == "app=api,t in (a,b),!c"
    assert str(MATCH_ALL) == "{}"


def test_workload_namespace_labels_always_carry_the_metadata_name_label() -> None:
    workload = Workload(
        kind=WorkloadKind.POD, namespace="payments", name="api-1", namespace_labels={"team": "p"}
    )
    assert workload.namespace_labels == {"team": "p", NAMESPACE_NAME_LABEL: "payments"}


def test_workload_labels_are_immutable_and_detached_from_the_callers_dict() -> None:
    labels = {"app": "api"}
    workload = Workload(kind=WorkloadKind.POD, namespace="ns", name="p", labels=labels)
    labels["app"] = "changed"
    assert workload.labels["app"] == "api"
    assert isinstance(workload.labels, FrozenLabels)
    with pytest.raises(TypeError):
        workload.labels["app"] = "x"  # type: ignore[index]


def test_workloads_are_hashable_and_replicas_share_a_selection_key() -> None:
    one = Workload(
        kind=WorkloadKind.POD, namespace="ns", name="api-1", uid="u1", labels={"app": "api"}
    )
    two = Workload(
        kind=WorkloadKind.POD, namespace="ns", name="api-2", uid="u2", labels={"app": "api"}
    )
    other = Workload(kind=WorkloadKind.POD, namespace="ns", name="db-1", labels={"app": "db"})
    assert len({one, two, other}) == 3
    assert one.selection_key == two.selection_key
    assert one.selection_key != other.selection_key


def test_unknown_workload_has_no_namespace_and_no_labels() -> None:
    assert UNKNOWN_WORKLOAD.kind is WorkloadKind.UNKNOWN
    assert UNKNOWN_WORKLOAD.namespace == ""
    assert dict(UNKNOWN_WORKLOAD.namespace_labels) == {}
    assert UNKNOWN_WORKLOAD.is_unknown


def _index() -> StaticIdentityIndex:
    net = ipaddress.ip_network
    return StaticIdentityIndex(
        [
            StaticIdentity(
                name="dc", namespace="legacy", cidrs=(net("10.0.0.0/8"),), labels={"site": "dc"}
            ),
            StaticIdentity(
                name="billing-vm",
                namespace="legacy",
                cidrs=(net("10.1.2.0/24"), net("2001:db8::/64")),
                labels={"app": "billing"},
                service_account="billing",
            ),
            StaticIdentity(name="one-host", namespace="legacy", cidrs=(net("10.1.2.7/32"),)),
        ]
    )


LOOKUPS = [
    ("10.9.9.9", "dc"),
    ("10.1.2.3", "billing-vm"),
    ("10.1.2.7", "one-host"),
    ("::ffff:10.1.2.3", "billing-vm"),
    ("2001:db8::5", "billing-vm"),
    ("2001:db8:1::5", None),
    ("192.0.2.1", None),
]


@pytest.mark.parametrize(("address", "expected"), LOOKUPS)
def test_static_index_picks_the_longest_prefix_and_unwraps_mapped_ipv4(
    address: str, expected: str | None
) -> None:
    workload = _index().lookup(ipaddress.ip_address(address))
    if expected is None:
        assert workload is UNKNOWN_WORKLOAD
    else:
        assert workload.name == expected


def test_static_identity_workload_looks_like_a_pod_in_a_virtual_namespace() -> None:
    workload = _index().lookup(ipaddress.ip_address("10.1.2.3"))
    assert workload.kind is WorkloadKind.STATIC
    assert workload.namespace == "legacy"
    assert workload.namespace_labels == {NAMESPACE_NAME_LABEL: "legacy"}
    assert workload.labels == {"app": "billing"}
    assert workload.service_account == "billing"
    assert (workload.owner_kind, workload.owner_name) == ("Static", "billing-vm")


def test_parse_static_identities_accepts_the_documented_shape() -> None:
    identities = parse_static_identities(
        [
            {
                "name": "laptop",
                "namespace": "dev",
                "cidrs": ["127.0.0.1/32", "::1/128"],
                "labels": {"app": "dev"},
            },
            {
                "name": "vm",
                "namespace": "legacy",
                "cidrs": ["10.0.0.0/24"],
                "serviceAccount": "batch",
            },
        ],
        file="outgate.yaml",
        path="identity.static",
    )
    assert [i.name for i in identities] == ["laptop", "vm"]
    assert identities[0].cidrs == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    assert identities[1].service_account == "batch"
    assert identities[1].labels == {}


STATIC_ERRORS: list[tuple[str, object, str, str]] = [
    (
        "host bits set",
        [{"name": "a", "namespace": "n", "cidrs": ["10.0.0.0/8", "10.1.2.3/16"]}],
        "identity.static[0].cidrs[1]",
        "write the network 10.1.0.0/16, or 10.1.2.3/32",
    ),
    (
        "not a cidr",
        [{"name": "a", "namespace": "n", "cidrs": ["banana"]}],
        "identity.static[0].cidrs[0]",
        "address/prefix",
    ),
    (
        "missing cidrs",
        [{"name": "a", "namespace": "n"}],
        "identity.static[0].cidrs",
        "cidrs: [10.0.0.5/32]",
    ),
    (
        "unknown key",
        [{"name": "a", "namespace": "n", "cidrs": ["10.0.0.1/32"], "serviceaccount": "x"}],
        "identity.static[0].serviceaccount",
        "did you mean 'serviceAccount'?",
    ),
    (
        "bad namespace",
        [{"name": "a", "namespace": "Not_OK", "cidrs": ["10.0.0.1/32"]}],
        "identity.static[0].namespace",
        "63",
    ),
    (
        "same cidr twice",
        [
            {"name": "a", "namespace": "n", "cidrs": ["10.0.0.1/32"]},
            {"name": "b", "namespace": "n", "cidrs": ["10.0.0.1/32"]},
        ],
        "identity.static[1].cidrs[0]",
        "give each CIDR to one identity",
    ),
    (
        "duplicate name",
        [
            {"name": "a", "namespace": "n", "cidrs": ["10.0.0.1/32"]},
            {"name": "a", "namespace": "n", "cidrs": ["10.0.0.2/32"]},
        ],
        "identity.static[1].name",
        "unique",
    ),
    ("not a list", {"name": "a"}, "identity.static", "write - {name"),
]


@pytest.mark.parametrize(
    ("case", "raw", "path", "fix"), STATIC_ERRORS, ids=[c[0] for c in STATIC_ERRORS]
)
def test_parse_static_identities_reports_the_field_path_and_the_fix(
    case: str, raw: object, path: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_static_identities(raw, file="outgate.yaml", path="identity.static")
    issues = caught.value.issues
    assert [issue.path for issue in issues] == [path], [i.render() for i in issues]
    assert fix in issues[0].fix
    assert issues[0].file == "outgate.yaml"
    assert issues[0].document is None


@pytest.mark.parametrize(
    ("workload", "spelled"),
    [
        (
            Workload(
                kind=WorkloadKind.POD,
                namespace="payments",
                name="api-7d9f-x2",
                owner_kind="Deployment",
                owner_name="api",
            ),
            "payments/Deployment/api",
        ),
        (
            Workload(kind=WorkloadKind.POD, namespace="payments", name="debug-shell"),
            "payments/Pod/debug-shell",
        ),
        (
            StaticIdentity(name="laptop", namespace="dev", cidrs=()).workload(),
            "dev/Static/laptop",
        ),
        (UNKNOWN_WORKLOAD, "unknown source"),
        (
            Workload(kind=WorkloadKind.AMBIGUOUS, namespace="payments", name="a-1,b-1"),
            "ambiguous: payments/a-1,b-1",
        ),
    ],
)
def test_a_workload_has_one_spelling_for_people(workload: Workload, spelled: str) -> None:
    """`namespace/Kind/name`: the audit record's kubernetes.namespace and outgate.workload."""
    assert workload.describe() == spelled
