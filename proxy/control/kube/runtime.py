"""Everything Kubernetes in one proxy process: the client, the identity informers, the pod
index, the policy CRD source and the Event reporter; started and stopped by proxy.app.

Readiness: the pod and namespace informers have listed once (decisions need both: a pod
without its namespace's labels could match the wrong policies), and, when policies come from
the cluster, both policy kinds are listed and installed. The Job informer only refines owner
names (Job -> CronJob) and is not waited for: a cluster without RBAC for Jobs still runs.

Policy status (issue 18): with policies from the cluster and `policies.status.write`, every
process takes part in the election of one status writer (proxy.control.kube.lease); the one
holding the Lease writes `.status` (proxy.control.kube.status), and releases the Lease when
it stops.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, replace
from typing import Any, Final

from proxy.config import Settings
from proxy.control.kube.client import KubeClient
from proxy.control.kube.config import ClusterConfig, in_cluster_config, load_kubeconfig
from proxy.control.kube.informers import (
    JOBS,
    NAMESPACES,
    PODS,
    JobSink,
    KubeIdentity,
    NamespaceSink,
    PodSink,
    SourceGone,
)
from proxy.control.kube.lease import (
    DEFAULT_LEASE_TIMING,
    LeaseElector,
    LeaseTiming,
    holder_identity,
)
from proxy.control.kube.policies import EventReporter, KubePolicySource
from proxy.control.kube.reflector import DEFAULT_TUNING, Reflector, ReflectorTuning
from proxy.control.kube.status import DEFAULT_WRITES_PER_SECOND, PolicyStatusWriter
from proxy.control.policy_source import PolicyStore
from proxy.core.identity import IdentityLookup
from proxy.core.podindex import PodIndex
from proxy.metrics import POD_AMBIGUOUS_IPS
from proxy.tasks import TaskSet

# How often the gauges that are ages or counts over the whole index are written.
METRICS_TICK_SECONDS: Final = 1.0
# Where the Lease lives when neither the config nor $POD_NAMESPACE says: the manifests' namespace.
DEFAULT_LEASE_NAMESPACE: Final = "outgate-system"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusWriting:
    """Who writes policy status: the holder of Lease `namespace/name`, as `identity`."""

    lease_namespace: str
    lease_name: str
    identity: str
    writes_per_second: float = DEFAULT_WRITES_PER_SECOND

    @classmethod
    def from_settings(
        cls, settings: Settings, environ: dict[str, str] | None = None
    ) -> StatusWriting | None:
        if not (settings.policy_kubernetes and settings.policy_status_write):
            return None
        env = dict(os.environ) if environ is None else environ
        namespace = (
            settings.policy_status_lease_namespace
            or env.get("POD_NAMESPACE")
            or DEFAULT_LEASE_NAMESPACE
        )
        return cls(
            lease_namespace=namespace,
            lease_name=settings.policy_status_lease_name,
            identity=holder_identity(env),
            writes_per_second=settings.policy_status_writes_per_second,
        )


def cluster_config(settings: Settings) -> ClusterConfig:
    """The kubeconfig when one is configured, else in-cluster. Raises ConfigError."""
    if settings.kubeconfig:
        return load_kubeconfig(settings.kubeconfig)
    return in_cluster_config()


class KubeControlPlane:
    def __init__(
        self,
        config: ClusterConfig,
        *,
        identity: bool,
        policies: bool,
        static: IdentityLookup,
        store: PolicyStore,
        on_source_gone: SourceGone,
        watch_jobs: bool = True,
        tuning: ReflectorTuning = DEFAULT_TUNING,
        status: StatusWriting | None = None,
        lease_timing: LeaseTiming = DEFAULT_LEASE_TIMING,
    ) -> None:
        self.client = KubeClient(config)
        self.index = PodIndex()
        self.identity_reflectors: list[Reflector] = []
        self.other_reflectors: list[Reflector] = []
        self.identity: IdentityLookup = static
        if identity:
            self.identity_reflectors = [
                Reflector(self.client, PODS, PodSink(self.index, on_source_gone), tuning=tuning),
                Reflector(self.client, NAMESPACES, NamespaceSink(self.index), tuning=tuning),
            ]
            if watch_jobs:
                self.other_reflectors.append(
                    Reflector(self.client, JOBS, JobSink(self.index), tuning=tuning)
                )
            self.identity = KubeIdentity(self.index, static, synced=self.identity_synced)
        self.reporter: EventReporter | None = None
        self.policy_source: KubePolicySource | None = None
        if policies:
            self.reporter = EventReporter(self.client)
            self.policy_source = KubePolicySource(
                self.client, store, reporter=self.reporter, tuning=tuning
            )
        self.status_writer: PolicyStatusWriter | None = None
        self.elector: LeaseElector | None = None
        if self.policy_source is not None and status is not None:
            self.elector = LeaseElector(
                self.client,
                namespace=status.lease_namespace,
                name=status.lease_name,
                identity=status.identity,
                timing=lease_timing,
            )
            self.status_writer = PolicyStatusWriter(
                self.client,
                self.policy_source,
                writes_per_second=status.writes_per_second,
                may_write=self.elector.may_act,
            )
            self.policy_source.status_changed = self.status_writer.changed
            self.elector.on_change = self.status_writer.set_active

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        static: IdentityLookup,
        store: PolicyStore,
        on_source_gone: SourceGone,
    ) -> KubeControlPlane:
        return cls(
            cluster_config(settings),
            identity=settings.identity_kubernetes,
            policies=settings.policy_kubernetes,
            static=static,
            store=store,
            on_source_gone=on_source_gone,
            watch_jobs=settings.identity_watch_jobs,
            status=StatusWriting.from_settings(settings),
            tuning=replace(
                DEFAULT_TUNING, inactivity_timeout=settings.timeouts.kube_watch_inactivity
            ),
        )

    @property
    def reflectors(self) -> list[Reflector]:
        policy = self.policy_source.reflectors if self.policy_source is not None else []
        return [*self.identity_reflectors, *self.other_reflectors, *policy]

    def identity_synced(self) -> bool:
        return all(reflector.synced for reflector in self.identity_reflectors)

    @property
    def synced(self) -> bool:
        policies = self.policy_source is None or self.policy_source.synced
        return policies and self.identity_synced()

    def start(self, tasks: TaskSet) -> None:
        for reflector in self.reflectors:
            tasks.spawn(reflector.run(), name=f"kube {reflector.resource.name} reflector")
        tasks.spawn(self._publish_metrics(), name="kube metrics")
        if self.policy_source is not None:
            tasks.spawn(self.policy_source.run(), name="kube policy installer")
        if self.reporter is not None:
            tasks.spawn(self.reporter.run(), name="kube event reporter")
        if self.elector is not None and self.status_writer is not None:
            tasks.spawn(self.elector.run(), name="kube policy-status lease")
            tasks.spawn(self.status_writer.run(), name="kube policy-status writer")

    async def _publish_metrics(self) -> None:
        while True:
            for reflector in self.reflectors:
                reflector.publish_age()
            if self.identity_reflectors:
                POD_AMBIGUOUS_IPS.set(self.index.ambiguous_ip_count)
            await asyncio.sleep(METRICS_TICK_SECONDS)

    def readiness_detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "api": self.client.config.server,
            "synced": {r.resource.name: r.synced for r in self.reflectors},
        }
        if self.identity_reflectors:
            detail["pods_indexed"] = len(self.index)
        if self.policy_source is not None:
            detail["policies_installed"] = self.policy_source.synced
            detail["invalid_policies"] = self.policy_source.invalid()
        if self.elector is not None:
            detail["policy_status_writer"] = self.elector.holding
        return detail

    async def close(self) -> None:
        """After the tasks are cancelled: give the Lease up, then close the client."""
        if self.elector is not None:
            await self.elector.release()
        await self.client.close()
