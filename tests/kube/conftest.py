"""Fixtures for the Kubernetes tests: the fake API server, and the informer stack run in the
test's event loop against it (the same KubeControlPlane the proxy builds)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.control.kube.config import load_kubeconfig
from proxy.control.kube.lease import LeaseTiming
from proxy.control.kube.reflector import Reflector, ReflectorTuning
from proxy.control.kube.runtime import KubeControlPlane, StatusWriting
from proxy.control.policy_source import PolicyStore
from proxy.core.hosts import IPAddress
from proxy.core.identity import StaticIdentityIndex, Workload
from proxy.metrics import REGISTRY
from proxy.tasks import TaskSet
from tests.support.fakekube import FakeKube
from tests.support.waiting import eventually

# Short delays so that faults heal within a test; the production values are in
# proxy.control.kube.reflector.ReflectorTuning.
FAST = ReflectorTuning(
    backoff_initial=0.05, backoff_max=0.4, inactivity_timeout=10.0, watch_timeout_seconds=120
)


# A Lease that lapses in 2 s, renewed every 0.2 s: take-overs within a test's patience.
FAST_LEASE = LeaseTiming(duration_seconds=2, renew_deadline=1.5, renew_period=0.2)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeKube]:
    with FakeKube(tmp_path / "kube") as server:
        yield server


def metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


class Informers:
    """The proxy's Kubernetes control plane, run in the test's loop. `gone` records every
    (ip, pod) the plane asked to close connections for."""

    def __init__(
        self,
        fake: FakeKube,
        *,
        tuning: ReflectorTuning = FAST,
        policies: bool = False,
        identity: bool = True,
        kubeconfig: Path | None = None,
        status: StatusWriting | None = None,
    ) -> None:
        self.fake = fake
        self.gone: list[tuple[IPAddress, str]] = []
        self.store = PolicyStore()
        self.plane = KubeControlPlane(
            load_kubeconfig(kubeconfig or fake.kubeconfig()),
            identity=identity,
            policies=policies,
            static=StaticIdentityIndex(()),
            store=self.store,
            on_source_gone=lambda ip, pod: self.gone.append((ip, pod)),
            tuning=tuning,
            status=status,
            lease_timing=FAST_LEASE,
        )
        self.tasks = TaskSet()

    async def __aenter__(self) -> Informers:
        self.plane.start(self.tasks)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.tasks.cancel_all()
        await self.plane.close()
        # Aborted TLS transports finish closing on the next loop turns; let them, so none is
        # left for the loop's teardown to report as unclosed.
        await asyncio.sleep(0.05)

    async def synced(self) -> Informers:
        """Listed, and every watch open (so no event made after this can be missed)."""
        await eventually(lambda: self.plane.synced)
        for reflector in self.plane.reflectors:
            await self.watching(reflector.resource.name)
        return self

    async def watching(self, resource: str, count: int = 1) -> None:
        await eventually(lambda: self.fake.open_watches(resource) >= count)

    @property
    def pods(self) -> Reflector:
        return self.plane.identity_reflectors[0]

    def lookup(self, ip: str) -> Workload:
        return self.plane.identity.lookup(ipaddress.ip_address(ip))

    def name_of(self, ip: str) -> str:
        workload = self.lookup(ip)
        return f"{workload.kind}:{workload.namespace}/{workload.name}"
