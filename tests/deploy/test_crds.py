"""The CustomResourceDefinitions agree with the policy loader.

Every example policy in config/ and manifests/ (commented-out examples included) is accepted by
both the CRD schema and the engine; documents the loader refuses are refused by the schema too,
where OpenAPI can say so; the rest are listed, with the loader shown to refuse them (the proxy
reports such objects as InvalidPolicy Events).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.control.kube import status
from proxy.control.kube.policies import policy_from_object
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import API_VERSION, Action, PolicyKind
from proxy.errors import ConfigError
from tests.deploy import kube

COMMENTED_START = "# apiVersion: outgate.dev/"


def _policy_files() -> list[Path]:
    files = [*(kube.REPO / "config").rglob("*.y*ml"), *kube.MANIFESTS.rglob("*.y*ml")]
    return sorted(f for f in files if f.is_file())


def _commented_examples(text: str) -> list[str]:
    """Commented-out policy documents: from `# apiVersion: outgate.dev/...` to the first line
    that is not a comment, with one leading "# " removed from each line."""
    examples: list[str] = []
    block: list[str] | None = None
    for line in [*text.splitlines(), ""]:
        if block is None:
            if line.startswith(COMMENTED_START):
                block = [line[2:]]
        elif line.startswith("#"):
            block.append(line[2:] if line.startswith("# ") else line[1:])
        else:
            examples.append("\n".join(block) + "\n")
            block = None
    return examples


def _example_documents() -> list[tuple[str, str]]:
    """(label, YAML text) for every policy document, active or commented out."""
    found: list[tuple[str, str]] = []
    for path in _policy_files():
        text = path.read_text(encoding="utf-8")
        label = str(path.relative_to(kube.REPO))
        for index, doc in enumerate(yaml.safe_load_all(text)):
            if isinstance(doc, dict) and doc.get("apiVersion") == API_VERSION:
                found.append((f"{label} (document {index + 1})", yaml.safe_dump(doc)))
        for index, example in enumerate(_commented_examples(text)):
            found.append((f"{label} (commented example {index + 1})", example))
    return found


EXAMPLES = _example_documents()


@pytest.fixture(scope="module")
def schemas() -> kube.CustomResourceSchemas:
    return kube.CustomResourceSchemas(kube.outgate_crds())


def test_the_crds_define_what_the_informer_watches() -> None:
    crds = {crd["metadata"]["name"]: crd["spec"] for crd in kube.outgate_crds()}
    assert set(crds) == {"clusteregresspolicies.outgate.dev", "egresspolicies.outgate.dev"}
    expected = {
        "clusteregresspolicies.outgate.dev": ("ClusterEgressPolicy", "Cluster"),
        "egresspolicies.outgate.dev": ("EgressPolicy", "Namespaced"),
    }
    for name, spec in crds.items():
        assert (spec["names"]["kind"], spec["scope"]) == expected[name]
        assert spec["group"] == "outgate.dev"
        assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [
            ("v1alpha1", True, True)
        ]
        assert f"{spec['group']}/{spec['versions'][0]['name']}" == API_VERSION


@pytest.mark.parametrize("crd", kube.outgate_crds(), ids=lambda c: c["metadata"]["name"])
def test_the_crd_schemas_are_structural(crd: kube.Obj) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert kube.structural_errors(schema) == []


def test_examples_were_found() -> None:
    labels = [label for label, _ in EXAMPLES]
    assert any("commented example" in label for label in labels)
    assert any(label.startswith("manifests/") for label in labels)
    assert any(label.startswith("config/") for label in labels)


@pytest.mark.parametrize(("label", "text"), EXAMPLES, ids=[label for label, _ in EXAMPLES])
def test_every_example_policy_is_valid_for_the_crd_and_the_engine(
    schemas: kube.CustomResourceSchemas, label: str, text: str
) -> None:
    documents = [d for d in yaml.safe_load_all(text) if d]
    for document in documents:
        assert schemas.knows(document), f"{label}: no CRD for {document.get('kind')}"
        assert schemas.errors(document) == [], label
    policies = load_text(text, file=label)  # raises ConfigError with every issue
    Engine.compile(policies, default_action=Action.DENY, revision=1)


# --- what both refuse -------------------------------------------------------------------------

CLUSTER: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "ClusterEgressPolicy",
    "metadata": {"name": "p"},
    "spec": {
        "tier": "admin",
        "rules": [{"name": "r", "action": "Allow", "to": [{"fqdn": "api.example.com"}]}],
    },
}
NAMESPACED: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "EgressPolicy",
    "metadata": {"name": "p", "namespace": "team"},
    "spec": {"rules": [{"name": "r", "action": "Allow", "to": [{"fqdn": "api.example.com"}]}]},
}


def _with(base: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """A copy of `base` with `path` ("spec.rules.0.to") set to `value`; `...` deletes it."""
    document = copy.deepcopy(base)
    node: Any = document
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return document


REFUSED_BY_BOTH = {
    "unknown spec field": _with(CLUSTER, "spec.tiers", "admin"),
    "missing tier": _with(CLUSTER, "spec.tier", ...),
    "tier namespace": _with(CLUSTER, "spec.tier", "namespace"),
    "priority above 1000": _with(CLUSTER, "spec.priority", 1001),
    "priority as text": _with(CLUSTER, "spec.priority", "10"),
    "mode typo": _with(CLUSTER, "spec.mode", "Audit"),
    "missing rules": _with(CLUSTER, "spec.rules", ...),
    "empty rules": _with(CLUSTER, "spec.rules", []),
    "rule name with capitals": _with(CLUSTER, "spec.rules.0.name", "Allow-API"),
    "action in lowercase": _with(CLUSTER, "spec.rules.0.action", "allow"),
    "Pass in an EgressPolicy": _with(NAMESPACED, "spec.rules.0.action", "Pass"),
    "tier in an EgressPolicy": _with(NAMESPACED, "spec.tier", "admin"),
    "subject in an EgressPolicy": _with(NAMESPACED, "spec.subject", {}),
    "podSelector at the top of a ClusterEgressPolicy": _with(CLUSTER, "spec.podSelector", {}),
    "empty to": _with(CLUSTER, "spec.rules.0.to", []),
    "fqdn and cidr in one entry": _with(
        CLUSTER, "spec.rules.0.to", [{"fqdn": "a.example.com", "cidr": "10.0.0.0/8"}]
    ),
    "unknown destination key": _with(CLUSTER, "spec.rules.0.to", [{"host": "a.example.com"}]),
    "bare star": _with(CLUSTER, "spec.rules.0.to", [{"fqdn": "*"}]),
    "star inside a label": _with(CLUSTER, "spec.rules.0.to", [{"fqdn": "api*.example.com"}]),
    "two stars": _with(CLUSTER, "spec.rules.0.to", [{"fqdn": "*.*.example.com"}]),
    "not a cidr": _with(CLUSTER, "spec.rules.0.to", [{"cidr": "10.0.0.0/33"}]),
    "empty ports": _with(CLUSTER, "spec.rules.0.ports", []),
    "protocol typo": _with(CLUSTER, "spec.rules.0.protocol", "TLS"),
    "inspect on a Deny": _with(
        _with(CLUSTER, "spec.rules.0.action", "Deny"), "spec.rules.0.inspect", {}
    ),
    "inspect on a tcp tunnel": _with(
        _with(CLUSTER, "spec.rules.0.protocol", "tcp"), "spec.rules.0.inspect", {}
    ),
    "unknown DLP detector": _with(CLUSTER, "spec.rules.0.inspect", {"dlp": ["credit-card"]}),
    "path without a slash": _with(CLUSTER, "spec.rules.0.inspect", {"paths": ["v2/*"]}),
    "star inside a path": _with(CLUSTER, "spec.rules.0.inspect", {"paths": ["/v2/*/x"]}),
    "selector operator typo": _with(
        CLUSTER,
        "spec.subject",
        {"podSelector": {"matchExpressions": [{"key": "app", "operator": "in", "values": ["a"]}]}},
    ),
    "label value too long": _with(
        CLUSTER, "spec.subject", {"podSelector": {"matchLabels": {"app": "x" * 64}}}
    ),
    "empty serviceAccounts": _with(CLUSTER, "spec.subject", {"serviceAccounts": []}),
    "owner kind in lowercase": _with(
        CLUSTER, "spec.subject", {"owners": [{"kind": "deployment", "name": "api"}]}
    ),
    "missing spec": _with(CLUSTER, "spec", ...),
}


def _loader_refuses(document: dict[str, Any]) -> bool:
    try:
        load_text(yaml.safe_dump(document), file="<test>")
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize("case", sorted(REFUSED_BY_BOTH))
def test_the_crd_refuses_what_the_loader_refuses(
    schemas: kube.CustomResourceSchemas, case: str
) -> None:
    document = REFUSED_BY_BOTH[case]
    assert _loader_refuses(document), "the loader accepts it: the case is wrong"
    assert schemas.errors(document) != []


# What OpenAPI cannot express; the API server stores these, the proxy refuses them and reports
# an InvalidPolicy Event. Listed so that the gap is known and stays this small.
LOADER_ONLY = {
    "port range as text": _with(CLUSTER, "spec.rules.0.ports", ["8000-8100"]),
    "port out of range": _with(CLUSTER, "spec.rules.0.ports", [70000]),
    "endPort below port": _with(CLUSTER, "spec.rules.0.ports", [{"port": 90, "endPort": 80}]),
    "cidr with host bits": _with(CLUSTER, "spec.rules.0.to", [{"cidr": "10.20.1.0/16"}]),
    "Allow under a bare TLD": _with(CLUSTER, "spec.rules.0.to", [{"fqdn": "*.com"}]),
    "IP address in fqdn": _with(CLUSTER, "spec.rules.0.to", [{"fqdn": "10.0.0.1"}]),
    "duplicate rule names": _with(
        CLUSTER,
        "spec.rules",
        [
            {"name": "r", "action": "Allow", "to": [{"fqdn": "a.example.com"}]},
            {"name": "r", "action": "Deny", "to": [{"fqdn": "b.example.com"}]},
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(LOADER_ONLY))
def test_what_the_crd_cannot_express_the_loader_refuses(
    schemas: kube.CustomResourceSchemas, case: str
) -> None:
    document = LOADER_ONLY[case]
    assert schemas.errors(document) == [], "the schema refuses it now: move it to REFUSED_BY_BOTH"
    assert _loader_refuses(document)


def test_the_structural_check_catches_a_type_inside_a_junctor() -> None:
    bad = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "anyOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"b": {}}}],
    }
    errors = kube.structural_errors(bad)
    assert any("sets type" in e for e in errors)
    assert any("property b is not specified outside" in e for e in errors)


# --- status and printer columns (issue 18) -------------------------------------------------------


@pytest.mark.parametrize("crd", kube.outgate_crds(), ids=lambda c: c["metadata"]["name"])
def test_the_crds_have_a_status_subresource_and_an_accepted_column(crd: kube.Obj) -> None:
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    expected = ["Mode", "Accepted", "Age"]
    if crd["spec"]["scope"] == "Cluster":
        expected = ["Tier", "Priority", *expected]
    assert list(columns) == expected
    assert columns["Accepted"]["jsonPath"] == (
        f'.status.conditions[?(@.type=="{status.ACCEPTED}")].status'
    )
    assert columns["Age"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }


def _with_status(base: dict[str, Any], verdict: status.Verdict) -> dict[str, Any]:
    document = copy.deepcopy(base)
    written = status.desired_status(None, verdict, 3, status.utc_now())
    assert written is not None
    document["status"] = written
    return document


@pytest.mark.parametrize("base", [CLUSTER, NAMESPACED], ids=["cluster", "namespaced"])
def test_the_status_the_proxy_writes_fits_the_schema(
    schemas: kube.CustomResourceSchemas, base: dict[str, Any]
) -> None:
    _, issues = policy_from_object(
        PolicyKind(base["kind"]), _with(base, "spec.rules.0.to", [{"fqdn": "*.com"}])
    )
    assert issues
    for verdict in (
        status.Verdict.valid(),
        status.Verdict.refused(status.AcceptedReason.INVALID, issues),
        status.Verdict.refused(status.AcceptedReason.NAME_CONFLICT, issues),
    ):
        assert schemas.errors(_with_status(base, verdict)) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", "Yes"),
        ("reason", "not camel case"),
        ("lastTransitionTime", "yesterday"),
        ("message", "x" * 32769),
    ],
)
def test_the_status_schema_refuses_a_malformed_condition(
    schemas: kube.CustomResourceSchemas, field: str, value: str
) -> None:
    document = _with_status(NAMESPACED, status.Verdict.valid())
    document["status"]["conditions"][0][field] = value
    assert schemas.errors(document) != []
