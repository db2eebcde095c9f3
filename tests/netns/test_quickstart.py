"""The README quick start, exactly as written: `make run`, then one allowed and one denied curl.

Runs in the test's own network namespace so the fixed ports of the README (3128, 9090, 8000)
are free and nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import curl

REPO = Path(__file__).resolve().parents[2]
RUN_STAMP = REPO / ".venv" / ".installed-run"


@pytest.fixture
def local_server(tmp_path: Path) -> Iterator[None]:
    (tmp_path / "index.html").write_text("hello from a local server\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "8000", "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield
    server.terminate()
    server.wait(10)


@pytest.fixture
def make_run() -> Iterator[subprocess.Popen[str]]:
    if (
        not RUN_STAMP.exists()
        or RUN_STAMP.stat().st_mtime < (REPO / "pyproject.toml").stat().st_mtime
    ):
        pytest.fail("run `make test` (it installs first); this namespace has no network for pip")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if '"listening"' in line:
            break
    else:
        pytest.fail("make run did not start listening")
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=20)


def test_make_run_then_curl_allowed_and_denied_as_the_readme_says(
    local_server: None, make_run: subprocess.Popen[str]
) -> None:
    allowed = curl("-x", "http://127.0.0.1:3128", "http://127.0.0.1:8000/index.html", max_time=10)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout == "hello from a local server\n"
    denied = curl("-x", "http://127.0.0.1:3128", "-i", "http://pastebin.com/raw/x", max_time=10)
    assert denied.stdout.startswith("HTTP/1.1 403")
    assert "X-Outgate-Reason: rule_deny" in denied.stdout
    tunnel = curl("-x", "http://127.0.0.1:3128", "https://pastebin.com/", max_time=10)
    assert tunnel.returncode != 0 and "403" in tunnel.stderr
    os.killpg(make_run.pid, signal.SIGTERM)
    out, _ = make_run.communicate(timeout=20)
    records = [json.loads(line) for line in out.splitlines()]  # stdout: records only
    decisions = [r for r in records if r["event"]["action"] == "decision"]
    assert [d["outgate"]["decision"] for d in decisions] == ["allow", "deny", "deny"]
    assert decisions[0]["rule"]["name"] == "local-dev-servers"
    assert decisions[1]["rule"] == {"name": "paste-sites", "ruleset": "no-paste-sites"}
    assert len([r for r in records if r["event"]["action"] == "close"]) == 3
