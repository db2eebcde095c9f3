"""A tier whose part this machine lacks is skipped with the reason for a developer, and fails the
run under CI=true, so CI never passes because a tier quietly did not run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.realkube import REPO

TIER_TEST = "tests/realkube/test_cluster.py"


def run_tier(ci: str | None, marker: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["OUTGATE_KUBE_APISERVER"] = f"/nonexistent/{marker}/kube-apiserver"
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", TIER_TEST, "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("ci", [None, "false"])
def test_a_developer_without_the_binaries_gets_a_skip_that_says_why(ci: str | None) -> None:
    result = run_tier(ci, "dev")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" in result.stdout
    assert "the real-API-server tier cannot run here" in result.stdout
    assert (
        "OUTGATE_KUBE_APISERVER=/nonexistent/dev/kube-apiserver is not executable" in result.stdout
    )


def test_under_ci_the_same_skip_fails_the_run() -> None:
    result = run_tier("true", "ci")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "CI=true: a skipped tier fails the run" in result.stdout
    assert "skipped" not in result.stdout.splitlines()[-1]
