"""The shipped alert rules (manifests/components/monitoring), rendered as an operator renders
them, and promtool to evaluate them: on synthetic series (rule unit tests) or on samples
scraped from a real proxy's /metrics."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy import kube


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: run `make install-test` (Debian package prometheus)")
    return found


def rule_spec() -> dict[str, Any]:
    rule = kube.one(kube.render("overlays/monitoring"), "PrometheusRule", "outgate")
    spec: dict[str, Any] = rule["spec"]
    return spec


def rules_file(directory: Path, *, annotations: bool = True) -> Path:
    spec = rule_spec()
    if not annotations:
        for group in spec["groups"]:
            for alert in group["rules"]:
                alert.pop("annotations", None)
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def alert_expr(name: str) -> str:
    for group in rule_spec()["groups"]:
        for alert in group["rules"]:
            if alert.get("alert") == name:
                return str(alert["expr"])
    raise KeyError(name)


def run_rule_tests(directory: Path, tests: Mapping[str, Any]) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` on `tests` (a rule-test file's content) beside the rules, without
    their annotations (promtool would compare those too; the tests are on labels)."""
    rules_file(directory, annotations=False)
    path = directory / "tests.yaml"
    path.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], **tests}))
    return subprocess.run(
        [promtool(), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=directory,
    )


class Scrapes:
    """Samples of some metrics from successive scrapes of one target, with the target labels a
    ServiceMonitor adds, as promtool input series (one scrape per `interval_seconds`)."""

    def __init__(self, names: Iterable[str], target: Mapping[str, str]) -> None:
        self.names = frozenset(names)
        self.target = dict(target)
        self.series: dict[str, list[float]] = {}
        self.count = 0

    def add(self, exposition: str) -> None:
        self.count += 1
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                if sample.name not in self.names:
                    continue
                labels = {**sample.labels, **self.target}
                key = (
                    sample.name
                    + "{"
                    + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                    + "}"
                )
                values = self.series.setdefault(key, [])
                # A series first seen late is absent before (promtool's "_").
                values.extend([float("nan")] * (self.count - 1 - len(values)))
                values.append(sample.value)

    def input_series(self) -> list[dict[str, str]]:
        return [
            {
                "series": key,
                "values": " ".join("_" if value != value else repr(value) for value in values),
            }
            for key, values in sorted(self.series.items())
        ]
