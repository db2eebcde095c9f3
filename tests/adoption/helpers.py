"""Helpers of the adoption tests: where the Squid configurations live, line lookup, importing
a configuration written by the test, and running the `outgate` command."""

from __future__ import annotations

import subprocess
from pathlib import Path

from proxy.adoption.squid_import import ImportOptions, ImportResult, import_squid
from proxy.core.identity import Workload, WorkloadKind
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import Action
from tests.support.proxyproc import outgate_command

DATA = Path(__file__).resolve().parent / "data"

# A pod, for configurations imported with --cluster-src (the ACL means "the cluster's pods").
POD = Workload(
    kind=WorkloadKind.POD,
    namespace="shop",
    name="web-5c9d",
    labels={"app": "web"},
    owner_kind="Deployment",
    owner_name="web",
)


def line_of(path: Path, text: str, *, whole: bool = False) -> int:
    """The 1-based number of the only line of `path` containing `text` (or equal to it)."""
    numbers = [
        number
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if (line.split("#")[0].strip() == text if whole else text in line)
    ]
    assert len(numbers) == 1, f"{text!r} is on lines {numbers} of {path}"
    return numbers[0]


def import_text(tmp_path: Path, text: str, **options: object) -> ImportResult:
    """Import `text` written as tmp_path/squid.conf."""
    path = tmp_path / "squid.conf"
    path.write_text(text)
    return import_squid(path, ImportOptions(**options))  # type: ignore[arg-type]


def engine_for(result: ImportResult) -> Engine:
    policies = load_text(result.policies_yaml, file="imported.yaml")
    return Engine.compile(policies, default_action=Action.DENY, revision=1)


def outgate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*outgate_command(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        input=stdin,
    )
