"""`make run | jq` works: stdout carries the audit records only (issue 14, defect 8).

Runs the project's own Makefile in this checkout, as a user runs it, with the install step forced
(`-W pyproject.toml`: make treats the file as just changed, so the pip install runs again, into
the same virtualenv) so its output is part of what is checked. The config listens on ports the
kernel picks, so the test can run beside anything else; the fixed ports of the README's
`make run` are exercised in the network namespace (tests/netns/test_quickstart.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import IO

from tests.support.clients import curl
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
# Seconds for the forced install and the start: pip reinstalls the checkout in editable mode.
MAKE_RUN_TIMEOUT = 120


def _shell_environment() -> dict[str, str]:
    """The environment of a user's shell: without a parent make's variables (under `make test`
    they say "inside make", and a make inside make prints its directory on stdout)."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}


def _collect(stream: IO[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def test_make_run_writes_only_audit_records_to_stdout(tmp_path: Path) -> None:
    config = tmp_path / "outgate.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n")
    out: list[str] = []
    err: list[str] = []
    with subprocess.Popen(
        ["make", "-W", "pyproject.toml", "run", f"ARGS=--config {config}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**_shell_environment(), "PYTHONUNBUFFERED": "1"},
    ) as make:
        assert make.stdout is not None and make.stderr is not None
        readers = [
            threading.Thread(target=_collect, args=(make.stdout, out), daemon=True),
            threading.Thread(target=_collect, args=(make.stderr, err), daemon=True),
        ]
        for reader in readers:
            reader.start()
        try:
            listening = wait_for(
                lambda: (
                    next((json.loads(line) for line in err if '"listening"' in line), None)
                    or make.poll() is not None
                ),
                MAKE_RUN_TIMEOUT,
                what="the proxy started by make run to log listening",
            )
            assert isinstance(listening, dict), "".join(err)
            refused = curl("-x", f"http://{listening['proxy']}", "-i", "http://denied.test/")
            assert refused.stdout.startswith("HTTP/1.1 403"), refused
            wait_for(lambda: len(out) >= 2, what="the decision and close records on stdout")
            os.kill(listening["pid"], signal.SIGTERM)  # the proxy, by its own pid
            assert make.wait(30) == 0, "".join(err)
        finally:
            if make.poll() is None:
                make.kill()
                make.wait(10)
            for reader in readers:
                reader.join(10)
    records = [json.loads(line) for line in out]  # every stdout line is a record
    assert [r["event"]["action"] for r in records] == ["decision", "close"], out
    assert "installing outgate" in "".join(err)  # the install did run, on stderr
