"""The Grafana dashboard of the monitoring component (issue 15): it parses as a dashboard, ships
as a ConfigMap the Grafana sidecar picks up, every expression is valid PromQL (promtool), and
every metric and label name an expression uses is in a scrape of a running proxy that has seen
traffic of each kind the panels show (allowed, denied, shadow differences, DNS failure, upstream
refusal, a request via a parent proxy, informers against a Kubernetes API)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy import kube
from tests.support.alerts import promtool
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fakekube import FakeKube, namespace
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, get_from, ready
from tests.support.tools import free_port
from tests.support.waiting import wait_for

DASHBOARD = kube.MANIFESTS / "components" / "monitoring" / "grafana-dashboard.json"
PANEL_TYPES = {"row", "timeseries", "table", "stat"}
# Grafana's variables, as Grafana substitutes them before querying.
VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*"}
FUNCTIONS_AND_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "rate", "increase", "irate",
    "histogram_quantile", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset",
}  # fmt: skip

StartProxy = Callable[..., ProxyProcess]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query, with Grafana's variables substituted."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    return found


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and label names a PromQL expression uses (in selectors' matchers and
    in by/without/on/ignoring clauses)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals say nothing about names
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    labels: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels.update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}", " ", text)
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        labels.update(name.strip() for name in clause.split(",") if name.strip())
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    metrics = {
        name
        for name in re.findall(r"[A-Za-z_:][\w:]*(?!\w)(?!\s*\()", text)
        if name not in FUNCTIONS_AND_KEYWORDS and not re.fullmatch(r"\d+\w*", name)
    }
    return metrics, labels


def test_names_in_reads_selectors_and_clauses() -> None:
    metrics, labels = names_in(
        'histogram_quantile(0.99, sum by (le, upstream) (rate(m_bucket{a="x{y}",b=~".*"}[5m])))'
        " - max(other_metric) > bool 0"
    )
    assert metrics == {"m_bucket", "other_metric"}
    assert labels == {"le", "upstream", "a", "b"}


def test_the_json_is_a_grafana_dashboard_with_the_panels_operators_need() -> None:
    board = dashboard()
    assert board["uid"] == "outgate-egress" and board["title"]
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y"))
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), panel["title"]
    used = {name for _, expr in expressions() for name in names_in(expr)[0]}
    for wanted in (
        "outgate_decisions_total",  # decisions by namespace
        "outgate_destination_requests_total",  # top denied destinations
        "outgate_shadow_decision_differences_total",  # what audit-mode policies would refuse
        "outgate_destination_bytes_total",  # bytes per namespace
        "outgate_active_connections",  # tunnels and connections
        "outgate_dns_lookup_seconds_bucket",  # latency
        "outgate_dns_lookups_total",  # DNS failures
        "outgate_upstream_proxy_up",  # upstream health
        "outgate_kube_synced",  # informer health
    ):
        assert wanted in used, wanted


def test_the_component_ships_it_as_a_configmap_for_grafanas_sidecar() -> None:
    objects = kube.render("overlays/monitoring")
    config_map = kube.one(objects, "ConfigMap", "outgate-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["outgate-egress.json"]) == dashboard()


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{index}", "expr": expr}
                    for index, (_, expr) in enumerate(expressions())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


POLICIES = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: client, namespace: tests}
spec:
  podSelector: {matchLabels: {app: client}}
  rules:
    - name: origins
      action: Allow
      to: [{fqdn: origin.test}, {fqdn: missing.test}, {fqdn: closed.test}, {fqdn: via.test},
           {cidr: 127.0.0.0/8}]
      ports: [{port: 1024, endPort: 65535}]
---
apiVersion: outgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: trial}
spec:
  tier: admin
  mode: audit
  rules:
    - name: no-origin
      action: Deny
      to: [{fqdn: origin.test}]
      ports: [{port: 1024, endPort: 65535}]
"""


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeKube]:
    with FakeKube(tmp_path / "kube") as server:
        server.create("namespaces", namespace("tests", {}))
        yield server


def _scrape(proxy: ProxyProcess) -> dict[str, set[str]]:
    """Sample name -> the label names its samples carry."""
    _, text = proxy.admin("/metrics")
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def test_every_expression_uses_metrics_and_labels_a_running_proxy_exports(
    start_proxy: StartProxy,
    dns_server: ScriptedDNSServer,
    origin: OriginServer,
    fake: FakeKube,
) -> None:
    for name in ("origin.test", "closed.test", "via.test"):
        dns_server.addresses(name, "127.0.0.1")
    proxy = start_proxy(
        POLICIES,
        nameserver=dns_server.nameserver,
        config={
            "identity": {"kubernetes": True, "kubeconfig": str(fake.kubeconfig())},
            # The origin server stands in for a parent proxy: it answers absolute-form requests.
            "upstreams": [{"name": "corp", "proxies": [f"http://127.0.0.1:{origin.port}"]}],
            "routes": {
                "default": "direct",
                "rules": [{"to": [{"fqdn": "via.test"}], "via": "corp"}],
            },
        },
    )
    wait_for(lambda: ready(proxy))
    port = origin.port
    for url, status in [
        (f"http://origin.test:{port}/hello", 200),  # allowed; an audit-mode policy would deny
        (f"http://denied.test:{port}/", 403),  # denied
        (f"http://missing.test:{port}/", 502),  # DNS failure (nxdomain)
        (f"http://closed.test:{free_port()}/", 502),  # upstream refused
        (f"http://via.test:{port}/hello", 200),  # via the parent proxy
    ]:
        assert get_from(proxy, "127.0.0.1", url)[0] == status, url
    proxy.wait_records(lambda r: r["event"]["action"] == "close", 5)
    exported = _scrape(proxy)
    for title, expr in expressions():
        metrics, labels = names_in(expr)
        assert metrics, title
        for metric in metrics:
            assert metric in exported, f"{title}: {metric} is not in the scrape"
            missing = labels - exported[metric]
            assert not missing, f"{title}: {metric} has no label {sorted(missing)} in the scrape"
