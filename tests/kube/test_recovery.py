"""Informer recovery and staleness (issue 18, defects D1 and D3) against the fake API server:
after a restart a quiet resource relists at once and a new policy is enforced promptly, on
every restart; a healthy watch or a quiet period ends a failure streak; a server that lists
fine but fails every watch sees a bounded rate of LISTs; silence on an idle resource is not a
fault, while a failing watch or list is."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from proxy.config import settings_from_mapping
from proxy.control.kube.reflector import Backoff, ReflectorTuning
from proxy.control.kube.runtime import KubeControlPlane
from proxy.control.policy_source import PolicyStore
from proxy.core.hosts import parse_host
from proxy.core.identity import StaticIdentityIndex, Workload, WorkloadKind
from proxy.core.policy.model import Destination
from tests.kube.conftest import FAST, Informers, metric
from tests.support.fakekube import FakeKube, namespace, pod
from tests.support.waiting import eventually

CLIENT = Workload(kind=WorkloadKind.POD, namespace="tests", name="c", labels={"app": "client"})

# The production shape (doubling from the initial delay, a cap far above it, the outage bound)
# at half the production delays, so a restart test is short but the backoff can climb well past
# what a prompt recovery allows.
RESTART = ReflectorTuning(
    backoff_initial=0.4, backoff_max=30.0, inactivity_timeout=10.0, watch_timeout_seconds=120
)


def allow_policy(name: str, fqdn: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "tests"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "client"}},
            "rules": [{"name": "r", "action": "Allow", "to": [{"fqdn": fqdn}]}],
        },
    }


def allowed(informers: Informers, host: str) -> bool:
    verdict = informers.store.decide(CLIENT, Destination(host=parse_host(host), port=443))
    return str(verdict.action) == "allow"


def connection_errors(resource: str) -> float:
    return metric("outgate_kube_api_errors_total", resource=resource, status="connection")


class _Ceiling(random.Random):
    """Jitter that always picks the top of the range, so a delay is its ceiling."""

    def random(self) -> float:
        return 1.0


@pytest.mark.parametrize(
    ("settings", "calls", "expected"),
    [
        # client-go's doubling to the cap.
        ({}, [(0, None)] * 5, [1, 2, 4, 8, 8]),
        # A delay is at most a quarter of the streak so far (never under the initial one).
        ({"outage_fraction": 0.25}, [(0, None), (1, None), (10, None), (40, None)], [1, 1, 2.5, 8]),
        # A quiet period after the last delay ended starts the climb over.
        ({"reset_after": 5}, [(0, None), (1, None), (3.5, None), (13, None)], [1, 2, 4, 1]),
        # A 429's Retry-After is a floor.
        ({}, [(0, None), (0, 6.0)], [1, 6.0]),
        # reset() (progress) ends the streak.
        (
            {"outage_fraction": 0.25},
            [(0, None), (20, None), ("reset", None), (30, None)],
            [1, 2, 1],
        ),
    ],
)
def test_backoff_delays(
    settings: dict[str, float], calls: list[tuple[Any, float | None]], expected: list[float]
) -> None:
    now = [0.0]
    backoff = Backoff(1, 8, rng=_Ceiling(), clock=lambda: now[0], **settings)
    delays: list[float] = []
    for at, retry_after in calls:
        if at == "reset":
            backoff.reset()
            continue
        now[0] = at
        delays.append(backoff.next(retry_after))
    assert delays == expected


async def test_after_each_of_three_restarts_a_new_policy_is_enforced_promptly(
    fake: FakeKube,
) -> None:
    # D1: the policy resources have no events, so the old reflector met the 410 after a
    # restart with a backoff (on top of the one the refused connections had climbed to, never
    # reset): 1.6 s at the least here, more on each restart.
    async with Informers(fake, identity=False, policies=True, tuning=RESTART) as informers:
        await informers.synced()
        for restart in range(3):
            # In sync before each restart (a watch open a second), as between real restarts.
            await eventually(
                lambda: all(r.seconds_since_sync == 0.0 for r in informers.plane.reflectors)
            )
            errors = connection_errors("egresspolicies")
            fake.go_down()
            # Down long enough for a few refused attempts (the backoff climbs meanwhile).
            await eventually(lambda: connection_errors("egresspolicies") >= errors + 3)  # noqa: B023
            fake.come_back()
            ready = time.monotonic()
            fake.create("egresspolicies", allow_policy(f"new-{restart}", f"r{restart}.example"))
            await eventually(lambda: allowed(informers, f"r{restart}.example"), timeout=10)  # noqa: B023
            took = time.monotonic() - ready
            assert took < 1.2, f"restart {restart}: enforced {took:.2f} s after the server's return"
            relist = fake.requests_for("egresspolicies", "list")[-1]
            assert relist.at >= ready and relist.status == 200  # a relist after the 410


async def fail_watches_then_recover(fake: FakeKube, failures: int) -> None:
    """Cut the pods watch and refuse the next `failures` watches (the backoff climbs), until
    one is answered."""
    fake.fail("pods", "watch", 500, times=failures)
    fake.abort_watches("pods")
    await eventually(lambda: [r.status for r in fake.requests_for("pods", "watch")][-1] == 200)


async def delay_after_a_cut(fake: FakeKube) -> float:
    """Cut the pods watch: the seconds until the reflector asks for the next one."""
    watches = len(fake.requests_for("pods", "watch"))
    cut = time.monotonic()
    fake.abort_watches("pods")
    await eventually(lambda: len(fake.requests_for("pods", "watch")) > watches)
    return fake.requests_for("pods", "watch")[watches].at - cut


async def test_a_healthy_watch_ends_the_failure_streak(fake: FakeKube) -> None:
    # D1: the backoff was reset only by a watch event, so after failures had climbed it to the
    # cap, a watch that was open and healthy but quiet left it there for the next failure.
    fake.create("namespaces", namespace("default"))
    tuning = dataclasses.replace(
        FAST,
        backoff_initial=0.1,
        backoff_max=1.6,
        backoff_outage_fraction=math.inf,  # the doubling alone, so only the reset can help
        min_watch_seconds=0.3,
    )
    async with Informers(fake, tuning=tuning) as informers:
        await informers.synced()
        await fail_watches_then_recover(fake, 5)
        # Open and healthy (a `min_watch_seconds` with no failure), though nothing happens.
        await eventually(lambda: informers.pods.seconds_since_sync == 0.0)
        gap = await delay_after_a_cut(fake)
        # Started over: at most the initial 0.1 s, not the 0.8 s or more of the climbed backoff.
        assert gap < 0.5, gap


async def test_the_backoff_starts_over_after_a_quiet_period(fake: FakeKube) -> None:
    # client-go's backoff manager: after `backoff_reset_after` without a failure the delays
    # start again from the initial one. Here no watch counts as progress (min_watch_seconds is
    # long) and the outage bound is off, so only the quiet period can reset the climb.
    fake.create("namespaces", namespace("default"))
    tuning = dataclasses.replace(
        FAST,
        backoff_initial=0.1,
        backoff_max=1.6,
        backoff_reset_after=0.5,
        backoff_outage_fraction=math.inf,
        min_watch_seconds=60,
    )
    async with Informers(fake, tuning=tuning) as informers:
        await informers.synced()
        await fail_watches_then_recover(fake, 4)
        await informers.watching("pods")
        opened = fake.requests_for("pods", "watch")[-1].at
        # The watch is open and quiet past the quiet period.
        await eventually(lambda: time.monotonic() - opened > 0.8)
        gap = await delay_after_a_cut(fake)
        assert gap < 0.5, gap  # 0.1 s at most; without the reset at least 0.8 s


@pytest.mark.parametrize("style", ["event", "http"])
async def test_a_server_that_lists_fine_but_expires_every_watch_gets_a_bounded_rate_of_lists(
    fake: FakeKube, style: str
) -> None:
    # The first 410 relists at once; a second with no progress between waits for the backoff,
    # at least half of the initial 0.2 s each time (more as the streak grows). A storm would
    # make a LIST and a watch per round trip, tens a second.
    fake.compaction_error = style
    fake.create("namespaces", namespace("default"))
    fake.create("pods", pod("p", "10.1.0.1"))
    fake.expire_every_watch = True
    tuning = dataclasses.replace(FAST, backoff_initial=0.2, backoff_max=2.0)
    async with Informers(fake, tuning=tuning) as informers:
        await eventually(lambda: informers.plane.synced)
        await eventually(lambda: len(fake.requests_for("pods", "list")) >= 10, timeout=30)
        lists = fake.requests_for("pods", "list")
        assert informers.lookup("10.1.0.1").name == "p"  # every LIST still applied
    # Over the window of the eight backed-off relists after the immediate one: at most ten
    # LISTs a second (each waits at least 0.1 s).
    window = lists[9].at - lists[1].at
    assert 8 / window <= 10, [round(r.at - lists[0].at, 3) for r in lists]


async def test_a_server_that_fails_every_watch_request_is_never_relisted(fake: FakeKube) -> None:
    fake.create("namespaces", namespace("default"))
    async with Informers(fake) as informers:
        await informers.synced()
        fake.fail("pods", "watch", 500, times=1000)
        fake.abort_watches("pods")
        await eventually(lambda: len(fake.requests_for("pods", "watch")) >= 8)
        assert len(fake.requests_for("pods", "list")) == 1
        fake.clear_faults()


async def test_an_idle_synced_informer_is_in_sync_and_its_renewals_are_not_warnings(
    fake: FakeKube,
) -> None:
    # D3: a 1.20 API server sends no bookmark on a resource without writes. The watch is
    # renewed after each inactivity window; that is not a fault, and the informer stays in sync.
    fake.create("namespaces", namespace("default"))
    tuning = dataclasses.replace(FAST, inactivity_timeout=0.4, min_watch_seconds=0.2)
    inactive = metric("outgate_kube_watch_restarts_total", resource="pods", reason="inactive")
    with capture_logs() as logs:
        async with Informers(fake, tuning=tuning) as informers:
            await informers.synced()
            await eventually(
                lambda: (
                    metric("outgate_kube_watch_restarts_total", resource="pods", reason="inactive")
                    >= inactive + 3
                )
            )
            reflector = informers.pods
            reflector.publish_age()
            assert metric("outgate_kube_seconds_since_last_event", resource="pods") > 1.0
            # Between renewals it may be a moment out of a healthy watch, never more.
            assert metric("outgate_kube_seconds_since_last_sync", resource="pods") < 0.5
            assert len(fake.requests_for("pods", "list")) == 1
    warnings = [e for e in logs if e["log_level"] in ("warning", "error")]
    assert warnings == []


async def test_a_failing_watch_is_out_of_sync_and_says_so(fake: FakeKube) -> None:
    fake.create("namespaces", namespace("default"))
    async with Informers(fake) as informers:
        await informers.synced()
        await eventually(lambda: informers.pods.seconds_since_sync == 0.0)
        informers.pods.publish_age()
        assert metric("outgate_kube_watch_established", resource="pods") == 1
        fake.fail("pods", "watch", 403, times=1000)
        fake.abort_watches("pods")
        await eventually(lambda: informers.pods.seconds_since_sync > 1.0)
        informers.pods.publish_age()
        assert metric("outgate_kube_seconds_since_last_sync", resource="pods") > 1.0
        assert metric("outgate_kube_watch_established", resource="pods") == 0
        assert metric("outgate_kube_synced", resource="pods") == 1  # listed once, long ago
        fake.clear_faults()
        await eventually(lambda: informers.pods.seconds_since_sync == 0.0)


async def test_a_failing_relist_is_out_of_sync(fake: FakeKube) -> None:
    fake.create("namespaces", namespace("default"))
    async with Informers(fake) as informers:
        await informers.synced()
        fake.fail("pods", "list", 500, times=1000)
        fake.bump()
        fake.compact()
        fake.abort_watches("pods")  # the rewatch gets a 410, and the relist fails
        await eventually(lambda: informers.pods.seconds_since_sync > 1.0)
        assert metric("outgate_kube_watch_established", resource="pods") == 0
        fake.clear_faults()
        await eventually(lambda: informers.pods.seconds_since_sync == 0.0)


async def test_the_watch_inactivity_window_is_a_setting(fake: FakeKube, tmp_path: Path) -> None:
    config = {
        "identity": {"kubernetes": True, "kubeconfig": str(fake.kubeconfig())},
        "policies": {"kubernetes": True},
        "timeouts": {"kubeWatchInactivity": "3s"},
    }
    settings = settings_from_mapping(config, file="outgate.yaml", base_dir=tmp_path)
    plane = KubeControlPlane.from_settings(
        settings, static=StaticIdentityIndex(()), store=PolicyStore(), on_source_gone=print
    )
    assert {r.tuning.inactivity_timeout for r in plane.reflectors} == {3.0}
    default = settings_from_mapping({}, file="outgate.yaml", base_dir=tmp_path)
    assert default.timeouts.kube_watch_inactivity == 150.0
    await plane.close()


async def test_a_503_starting_is_retried_on_the_backoff_not_after_its_retry_after(
    fake: FakeKube,
) -> None:
    # A restarting API server answers 503 "server is starting" with Retry-After 10 on custom
    # resources until it is ready; waiting 10 s would miss the 2 s target by far.
    fake.create("namespaces", namespace("default"))
    fake.fail("pods", "list", 503, times=2, retry_after=10)
    async with Informers(fake) as informers:
        await informers.synced()
        lists = fake.requests_for("pods", "list")
        assert [r.status for r in lists] == [503, 503, 200]
        assert lists[2].at - lists[0].at < 2.0
