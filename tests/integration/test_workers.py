"""`workers: 2`: a supervisor runs two workers on one port (SO_REUSEPORT), starts a killed worker
again, and /metrics on the admin port adds up what every worker counted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, outgate_command, read_response
from tests.support.tools import tool

StartProxy = Callable[..., ProxyProcess]
# Connections tried while one worker is stopped: each lands on either worker by the hash of
# its source port, so the chance that every one lands on the stopped worker is 2**-ATTEMPTS.
ATTEMPTS = 40


@pytest.fixture
def proxy(start_proxy: StartProxy, dns_server: ScriptedDNSServer) -> ProxyProcess:
    dns_server.addresses("origin.test", "127.0.0.1")
    return start_proxy(
        policy_allowing("origin.test"), nameserver=dns_server.nameserver, config={"workers": 2}
    )


def worker_pids(proxy: ProxyProcess, count: int) -> dict[int, int]:
    """worker index -> pid of the latest start, once `count` workers have said `listening`."""
    listening = proxy._wait(proxy.logs, lambda e: e.get("event") == "listening", count, 30.0)
    started = [e for e in proxy.logs if e.get("event") == "worker_started"]
    pids = {entry["worker"]: entry["pid"] for entry in started}
    assert {entry["pid"] for entry in listening} >= set(pids.values())
    return pids


def get_hello(proxy: ProxyProcess, origin: OriginServer, *, timeout: float) -> int | None:
    """One request on a new connection: the status, or None if nobody answered in time."""
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
            sock.sendall(
                f"GET http://origin.test:{origin.port}/hello HTTP/1.1\r\n"
                f"Host: origin.test:{origin.port}\r\nConnection: close\r\n\r\n".encode()
            )
            status, _, _ = read_response(sock, timeout=timeout)
            return status
    except (TimeoutError, OSError, AssertionError):
        return None


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_a_killed_worker_is_started_again_and_the_new_worker_serves(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    before = worker_pids(proxy, 2)
    victim, survivor = before[0], before[1]
    os.kill(victim, signal.SIGKILL)
    exited = proxy.wait_log(lambda e: e.get("event") == "worker_exited", timeout=30.0)
    assert exited["pid"] == victim
    assert exited["cause"] == "signal SIGKILL"
    after = worker_pids(proxy, 3)  # the replacement is listening too
    replacement = after[0]
    assert replacement not in (victim, survivor)

    # With the survivor stopped, only the replacement can answer.
    os.kill(survivor, signal.SIGSTOP)
    answered = None
    try:
        for _ in range(ATTEMPTS):
            answered = get_hello(proxy, origin, timeout=2.0)
            if answered is not None:
                break
    finally:
        os.kill(survivor, signal.SIGCONT)
    assert answered == 200
    assert get_hello(proxy, origin, timeout=10.0) == 200

    _, text = proxy.admin("/metrics")
    assert metric(text, "outgate_worker_restarts_total") == 1.0


def test_metrics_add_up_the_connections_of_every_worker(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    pids = worker_pids(proxy, 2)
    requests = 20
    for _ in range(requests):
        assert get_hello(proxy, origin, timeout=10.0) == 200
    proxy.wait_records(lambda r: r["event"]["action"] == "close", count=requests)

    served: dict[str, Any] = {}
    for _ in range(4):  # whichever worker answers the scrape, the sums are the same
        status, text = proxy.admin("/metrics")
        assert status == 200
        served["accepted"] = metric(text, "outgate_connections_accepted_total")
        served["decisions"] = metric(
            text,
            "outgate_decisions_total",
            action="allow",
            namespace="tests",
            reason="rule_allow",
        )
        # A gauge every worker holds alike merges to one worker's value, not a sum of them.
        served["revision"] = metric(text, "outgate_policy_revision")
        assert served == {"accepted": requests, "decisions": requests, "revision": 1.0}
    assert len(pids) == 2


def test_without_a_writable_temporary_directory_run_stops_with_a_one_line_error(
    tmp_path: Path,
) -> None:
    """The container case (`--read-only` with no /tmp mount), in a mount namespace where $TMPDIR
    is a read-only tmpfs: no traceback, one line naming the setting and the fix."""
    config = tmp_path / "outgate.yaml"
    config.write_text(
        yaml.safe_dump({"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "workers": 2})
    )
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mount_then_run = 'mount -t tmpfs -o ro,size=4k outgate-test "$TMPDIR" && exec "$@"'
    run = [*outgate_command(), "run", "--config", str(config)]
    result = subprocess.run(
        [tool("unshare"), "--mount", "--", "sh", "-c", mount_then_run, "sh", *run],
        env=os.environ | {"TMPDIR": str(read_only)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {config}: workers: 2 worker processes share their metrics through a temporary "
        f"directory, and {read_only} is not writable (Read-only file system) -- fix: mount an "
        f"emptyDir or a tmpfs at {read_only} (docker run --tmpfs {read_only}), or workers: 1"
    ]
