"""The monitoring component: the ServiceMonitor finds the admin port, the alert rules are valid
PromQL (promtool), name only metrics the proxy exports, and fire when they should (promtool's
rule unit tests on synthetic series)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from proxy import metrics
from tests.deploy import kube
from tests.support.alerts import promtool, rules_file, run_rule_tests

# Metrics from elsewhere: kube-state-metrics and Prometheus itself.
EXTERNAL_METRICS = {"kube_deployment_status_replicas_available", "up"}


def _exported() -> set[str]:
    names: set[str] = set()
    for collector in list(metrics.REGISTRY._collector_to_names):  # no public list of collectors
        for family in collector.describe():
            names.add(family.name)
            names.update(
                f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count")
            )
    return names


def test_the_servicemonitor_scrapes_the_admin_service() -> None:
    objects = kube.render("overlays/monitoring")
    monitor = kube.one(objects, "ServiceMonitor", "outgate")["spec"]
    service = kube.one(objects, "Service", "outgate-admin")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["endpoints"]] == ["admin"] and "admin" in ports
    assert monitor["endpoints"][0]["honorLabels"] is True  # keeps the source `namespace` label


def test_the_alert_rules_are_valid_promql(tmp_path: Path) -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(rules_file(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_cover_what_operators_need() -> None:
    rule = kube.one(kube.render("overlays/monitoring"), "PrometheusRule", "outgate")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "OutgateDeniedRateSpike",
        "OutgatePolicyReloadFailing",
        "OutgateInformerStale",
        "OutgateAuditBackpressure",
        "OutgateNoReadyReplicas",
        "OutgateUpstreamDown",
    } <= set(alerts)
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        anchor = alert["annotations"]["runbook"].partition("#")[2]
        headings = (kube.REPO / "docs" / "operations.md").read_text().lower()
        assert f"### {anchor.replace('-', ' ')}" in headings, f"{name}: no runbook section {anchor}"


def test_the_alerts_use_only_exported_metrics() -> None:
    rule = kube.one(kube.render("overlays/monitoring"), "PrometheusRule", "outgate")
    exported = _exported()
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            names = set(re.findall(r"\b((?:outgate|kube)_[a-z_]+)\b", alert["expr"]))
            unknown = names - exported - EXTERNAL_METRICS
            assert unknown == set(), alert["alert"]


PROXY = 'namespace="outgate-system", pod="outgate-a"'
PROXY_B = 'namespace="outgate-system", pod="outgate-b"'
PROXY_C = 'namespace="outgate-system", pod="outgate-c"'
DENIES = 'outgate_decisions_total{action="deny", '
# 1530 minutes of history: team-a denies 10/s for the last 30 minutes and never before (a spike);
# team-b a steady 2/s (no spike); the policy reload fails for the last 20 minutes; two replicas
# stay available. Informers: outgate-a is synced and idle (no event on pods for 30 minutes, its
# watch healthy: not stale); outgate-b's namespaces watch has failed for the last 20 minutes;
# outgate-c never finished listing pods.
UNIT_TESTS = {
    "rule_files": ["rules.yaml"],
    "evaluation_interval": "1m",
    "tests": [
        {
            "interval": "1m",
            "input_series": [
                {"series": DENIES + 'namespace="team-a", reason="x"}', "values": "0x1500 0+600x30"},
                {"series": DENIES + 'namespace="team-b", reason="x"}', "values": "0+120x1530"},
                {
                    "series": f"outgate_policy_last_reload_success{{{PROXY}}}",
                    "values": "1x1510 0x20",
                },
                {"series": f'outgate_kube_synced{{{PROXY}, resource="pods"}}', "values": "1x1530"},
                {
                    "series": f'outgate_kube_seconds_since_last_event{{{PROXY}, resource="pods"}}',
                    "values": "30x1500 30+60x30",
                },
                {
                    "series": f'outgate_kube_seconds_since_last_sync{{{PROXY}, resource="pods"}}',
                    "values": "0x1530",
                },
                {
                    "series": f'outgate_kube_synced{{{PROXY_B}, resource="namespaces"}}',
                    "values": "1x1530",
                },
                {
                    "series": "outgate_kube_seconds_since_last_sync"
                    f'{{{PROXY_B}, resource="namespaces"}}',
                    "values": "0x1510 0+60x20",
                },
                {
                    "series": f'outgate_kube_synced{{{PROXY_C}, resource="pods"}}',
                    "values": "0x1530",
                },
                {
                    "series": f'outgate_kube_seconds_since_last_sync{{{PROXY_C}, resource="pods"}}',
                    "values": "0+60x1530",
                },
                # Upstream corp: both parents down for the last 10 minutes; upstream partial:
                # one of its two parents down, the other up.
                {
                    "series": 'outgate_upstream_proxy_up{upstream="corp", proxy="a:3128"}',
                    "values": "1x1520 0x10",
                },
                {
                    "series": 'outgate_upstream_proxy_up{upstream="corp", proxy="b:3128"}',
                    "values": "1x1520 0x10",
                },
                {
                    "series": 'outgate_upstream_proxy_up{upstream="partial", proxy="c:3128"}',
                    "values": "0x1530",
                },
                {
                    "series": 'outgate_upstream_proxy_up{upstream="partial", proxy="d:3128"}',
                    "values": "1x1530",
                },
                {
                    "series": "kube_deployment_status_replicas_available"
                    '{namespace="outgate-system", deployment="outgate"}',
                    "values": "2x1530",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "1530m",
                    "alertname": "OutgateDeniedRateSpike",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "team-a"}}],
                },
                {
                    "eval_time": "1530m",
                    "alertname": "OutgatePolicyReloadFailing",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "namespace": "outgate-system",
                                "pod": "outgate-a",
                            }
                        }
                    ],
                },
                {
                    "eval_time": "1530m",
                    "alertname": "OutgateInformerStale",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "namespace": "outgate-system",
                                "pod": pod,
                                "resource": resource,
                            }
                        }
                        for pod, resource in (("outgate-b", "namespaces"), ("outgate-c", "pods"))
                    ],
                },
                {
                    # outgate-b's watch has failed for 5 minutes: past the threshold, not yet
                    # for the alert's 5 minutes.
                    "eval_time": "1515m",
                    "alertname": "OutgateInformerStale",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "namespace": "outgate-system",
                                "pod": "outgate-c",
                                "resource": "pods",
                            }
                        }
                    ],
                },
                {
                    "eval_time": "1530m",
                    "alertname": "OutgateUpstreamDown",
                    "exp_alerts": [{"exp_labels": {"severity": "critical", "upstream": "corp"}}],
                },
                {"eval_time": "1530m", "alertname": "OutgateNoReadyReplicas", "exp_alerts": []},
                {"eval_time": "1530m", "alertname": "OutgateAuditBackpressure", "exp_alerts": []},
            ],
        }
    ],
}


def test_the_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    result = run_rule_tests(tmp_path, UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
