"""Informer recovery and staleness against a real kube-apiserver (issue 18, D1 and D3): after
each of three restarts a policy created right after readiness decides within 2 s; deletions
missed across an etcd compaction take effect by a relist; an idle proxy's alert expression
stays false, while a proxy that cannot sync makes it true."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.realkube.conftest import PROXY_NAMESPACE, proxy_on
from tests.support.alerts import Scrapes, alert_expr, run_rule_tests
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, get_from, ready
from tests.support.realkube import RealKube, cluster_policy
from tests.support.waiting import wait_for

# The target: a policy created right after an API-server restart decides requests
# within 2 s of the server's readiness, on every restart.
RECOVERY_TARGET_SECONDS = 2.0
POLICY_AFTER_READY_SECONDS = 0.3
# How long each restart leaves the port closed before the new process starts (which then takes
# its own seconds to be ready): clients meet refused connections, and a backoff that climbs on
# them and is never reset leaves a quiet resource unlisted long after readiness (D1: 10.5 s,
# 13.4 s and 48.9 s were measured).
DOWN_SECONDS = 4.0
# Short, so that a test outlasts a few inactivity windows in seconds (production: 150 s).
INACTIVITY = 2.0
STALENESS_INPUTS = ("outgate_kube_synced", "outgate_kube_seconds_since_last_sync")
TARGET = {"namespace": PROXY_NAMESPACE, "pod": "outgate-test"}


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    """Proxies a test started, stopped after it (resumed first, if it left one stopped)."""
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.signal(signal.SIGCONT)
        proxy.stop()


def labelled_namespace(kube: RealKube, name: str) -> None:
    kube.create_namespace(name, {"outgate.dev/test-namespace": name})


def status_from(proxy: ProxyProcess, ip: str, url: str) -> int:
    return get_from(proxy, ip, url)[0]


def test_after_each_of_three_restarts_a_new_policy_decides_within_two_seconds(
    private_kube: Callable[..., RealKube],
    proxies: list[ProxyProcess],
    pod_ip: Callable[[], str],
    origin: OriginServer,
    tmp_path: Path,
) -> None:
    kube = private_kube()
    namespace, ip = "restarts", pod_ip()
    labelled_namespace(kube, namespace)
    kube.create_pod(namespace, "client", ip, labels={"app": "client"})
    proxy = proxy_on(kube, tmp_path / "proxy")
    proxies.append(proxy.start())
    wait_for(lambda: ready(proxy), what="the proxy synced")
    url = f"http://127.0.0.1:{origin.port}/hello"
    assert status_from(proxy, ip, url) == 403  # no policy allows it yet
    took: list[float] = []
    for restart in range(3):
        ready_at = kube.restart_apiserver(down_for=DOWN_SECONDS)
        # The scenario, not a wait for a condition: the policy is created 0.3 s after readiness.
        time.sleep(max(0.0, ready_at + POLICY_AFTER_READY_SECONDS - time.monotonic()))
        policy = kube.apply(cluster_policy(f"after-restart-{restart}", namespace))
        allowed_at = wait_for(
            lambda: status_from(proxy, ip, url) == 200 and time.monotonic(),
            timeout=30,
            what=f"the policy created after restart {restart} in force",
        )
        took.append(allowed_at - ready_at)
        # Back to denied before the next restart, so each restart's policy is a new one.
        kube.delete(kube.object_path(policy))
        wait_for(lambda: status_from(proxy, ip, url) == 403, what="the policy's deletion")
    assert all(seconds <= RECOVERY_TARGET_SECONDS for seconds in took), took
    assert proxy.proc is not None and proxy.proc.poll() is None


def test_deletions_missed_across_a_compaction_take_effect_by_a_relist(
    private_kube: Callable[..., RealKube],
    proxies: list[ProxyProcess],
    pod_ip: Callable[[], str],
    origin: OriginServer,
    tmp_path: Path,
) -> None:
    # Without the watch cache, a watch from a compacted version reaches etcd and gets a 410;
    # with it, the cache would serve the missed events from memory and no relist would happen.
    kube = private_kube("--watch-cache=false")
    namespace, gone_ip, kept_ip, new_ip = "compaction", pod_ip(), pod_ip(), pod_ip()
    labelled_namespace(kube, namespace)
    kube.apply(cluster_policy("compaction", namespace))
    kube.create_pod(namespace, "gone", gone_ip)
    kube.create_pod(namespace, "kept", kept_ip)
    proxy = proxy_on(kube, tmp_path / "proxy", timeouts={"kubeWatchInactivity": f"{INACTIVITY}s"})
    proxies.append(proxy.start())
    wait_for(lambda: ready(proxy), what="the proxy synced")
    url = f"http://127.0.0.1:{origin.port}/hello"
    assert status_from(proxy, gone_ip, url) == 200

    stopped_at = time.monotonic()
    proxy.signal(signal.SIGSTOP)
    try:
        kube.delete(f"/api/v1/namespaces/{namespace}/pods/gone")
        kube.create_pod(namespace, "new", new_ip)
        kube.compact()
        # Stopped past its inactivity window: on resume the silent watch is renewed from the
        # version it last saw, which the compaction expired.
        time.sleep(max(0.0, stopped_at + INACTIVITY + 1.0 - time.monotonic()))
    finally:
        proxy.signal(signal.SIGCONT)

    relist = proxy.wait_log(
        lambda e: (
            (e.get("event"), e.get("resource"), e.get("reason"))
            == ("kube_listed", "pods", "expired")
        ),
        timeout=30,
    )
    assert relist["synthesised_deletions"] >= 1
    # The deleted pod's address is an unknown source now (denied); the others are known.
    wait_for(lambda: status_from(proxy, gone_ip, url) == 403, what="the deletion in effect")
    assert status_from(proxy, kept_ip, url) == 200
    assert status_from(proxy, new_ip, url) == 200


def scrape(proxy: ProxyProcess, scrapes: Scrapes) -> str:
    """One scrape of the proxy's /metrics, kept in `scrapes`."""
    status, text = proxy.admin("/metrics")
    assert status == 200
    scrapes.add(text)
    return text


def fewest_idle_renewals(exposition: str) -> float:
    """The fewest renewals of an idle watch (ended by the inactivity window) over the
    resources the proxy watches; 0 before every resource has one."""
    renewals = {
        line.split('resource="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith("outgate_kube_watch_restarts_total{") and 'reason="inactive"' in line
    }
    return min(renewals.values()) if len(renewals) >= 4 else 0.0


def evaluate_on_scrapes(tmp_path: Path, scrapes: Scrapes, expected: list[dict[str, Any]]) -> str:
    """promtool evaluates OutgateInformerStale's expression at every scrape; "" if every
    evaluation gave `expected`, else promtool's report."""
    expr = alert_expr("OutgateInformerStale")
    tmp_path.mkdir()
    result = run_rule_tests(
        tmp_path,
        {
            "evaluation_interval": "1s",
            "tests": [
                {
                    "interval": "1s",
                    "input_series": scrapes.input_series(),
                    "promql_expr_test": [
                        {"expr": expr, "eval_time": f"{second}s", "exp_samples": expected}
                        for second in range(scrapes.count)
                    ],
                }
            ],
        },
    )
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_an_idle_proxy_is_not_stale_and_one_that_cannot_sync_is(
    realkube: RealKube, kube_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    # The alert's inputs are scraped from the proxy's /metrics once a second (as a
    # ServiceMonitor would, adding the target labels) and promtool evaluates the shipped
    # alert's expression on those samples at each scrape.
    idle = kube_proxy(timeouts={"kubeWatchInactivity": f"{INACTIVITY}s"})
    wait_for(lambda: ready(idle), what="the proxy synced")
    scrapes = Scrapes(STALENESS_INPUTS, TARGET)
    # No writes while three inactivity windows pass: every idle watch is renewed thrice.
    wait_for(
        lambda: fewest_idle_renewals(scrape(idle, scrapes)) >= 3,
        timeout=60,
        interval=1.0,
        what="three renewals of every idle watch",
    )
    assert evaluate_on_scrapes(tmp_path / "rules-idle", scrapes, []) == ""
    idle_events = [e for e in idle.logs if e.get("event") == "kube_watch_inactive"]
    assert idle_events == []  # renewing an idle watch is not worth a log line at info
    kube_warnings = [
        e
        for e in idle.logs
        if e.get("level") in ("warning", "error") and str(e.get("event")).startswith("kube_")
    ]
    assert kube_warnings == []

    # A proxy whose ServiceAccount has no RBAC never syncs: the expression is true.
    realkube.apply(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "no-rbac", "namespace": PROXY_NAMESPACE},
        }
    )
    kubeconfig = realkube.service_account_kubeconfig(
        PROXY_NAMESPACE, "no-rbac", tmp_path / "no-rbac.kubeconfig"
    )
    unsynced = kube_proxy(name="unsynced", identity={"kubeconfig": str(kubeconfig)})
    unsynced.wait_log(lambda e: e.get("event") == "kube_api_error" and e.get("status") == 403)
    scrapes = Scrapes(STALENESS_INPUTS, TARGET)
    wait_for(lambda: scrape(unsynced, scrapes) and scrapes.count >= 3, interval=1.0)
    resources = {
        key.split('resource="')[1].split('"')[0]
        for key in scrapes.series
        if key.startswith("outgate_kube_synced{")
    }
    assert {"pods", "namespaces", "clusteregresspolicies", "egresspolicies"} <= resources
    target = ", ".join(f'{k}="{v}"' for k, v in sorted(TARGET.items()))
    stale = [{"labels": f'{{{target}, resource="{r}"}}', "value": 0} for r in sorted(resources)]
    assert evaluate_on_scrapes(tmp_path / "rules-unsynced", scrapes, stale) == ""
