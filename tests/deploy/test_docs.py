"""The operator docs stay true: they name only files that exist, and document every metric and
every core audit field."""

from __future__ import annotations

import re

import pytest

from proxy import metrics
from proxy.audit import Exchange, close_record, decision_record
from proxy.core.identity import Workload, WorkloadKind
from proxy.errors import Reason
from tests.deploy import kube

DOCS = kube.REPO / "docs"
OWN_DOCS = [
    "install.md",
    "policy-reference.md",
    "audit-reference.md",
    "metrics.md",
    "operations.md",
    "threat-model.md",
    "transparent-mode.md",
    "ui.md",
]
PATH = re.compile(r"(?<![\w/.-])((?:manifests|config|docs|proxy|tests)/[\w./-]*[\w/])")


@pytest.mark.parametrize("name", OWN_DOCS)
def test_the_docs_name_only_files_that_exist(name: str) -> None:
    text = (DOCS / name).read_text()
    missing = [p for p in PATH.findall(text) if not (kube.REPO / p).exists()]
    # The overlay the install guide asks the reader to create by copying production.
    missing = [p for p in missing if not p.startswith("manifests/overlays/mycluster")]
    assert missing == []


def test_the_install_guide_applies_only_kustomizations_that_render() -> None:
    text = (DOCS / "install.md").read_text()
    applied = set(re.findall(r"-k (manifests/[\w/-]+)", text)) - {"manifests/overlays/mycluster"}
    assert applied
    for path in applied:
        assert kube.render(path.removeprefix("manifests/"))


def test_every_metric_is_documented() -> None:
    text = (DOCS / "metrics.md").read_text()
    names = {
        family.name
        for collector in list(metrics.REGISTRY._collector_to_names)
        for family in collector.describe()
    }
    undocumented = sorted(n for n in names if f"`{n}`" not in text and f"`{n}_total`" not in text)
    assert undocumented == [], "add them to docs/metrics.md"


def _keys(node: object, prefix: str = "") -> set[str]:
    if isinstance(node, dict):
        return {k for key, value in node.items() for k in _keys(value, f"{prefix}{key}.")}
    return {prefix.rstrip(".")}


def test_every_core_audit_field_is_documented() -> None:
    workload = Workload(
        kind=WorkloadKind.POD,
        namespace="payments",
        name="api-1",
        uid="u",
        service_account="api",
        owner_kind="Deployment",
        owner_name="api",
    )
    exchange = Exchange(
        kind="forward",
        source_ip="10.244.2.20",
        source_port=40000,
        workload=workload,
        destination_domain="api.example.com",
        destination_ip="203.0.113.9",
        destination_port=443,
        method="GET",
        path="/",
        server_name="api.example.com",
        status=403,
        reason=Reason.DEFAULT_DENY,
        upgrade="websocket",
        proxy_peer_ip="10.0.0.4",
        proxy_peer_port=50000,
        proxy_protocol=2,
        user_name="alice",
    )
    fields = _keys(decision_record(exchange)) | _keys(close_record(exchange, Reason.COMPLETED))
    text = (DOCS / "audit-reference.md").read_text()
    undocumented = sorted(f for f in fields if f"`{f}`" not in text and f"`{f}," not in text)
    assert undocumented == [], "add them to docs/audit-reference.md"
