"""The identity informers: pods, namespaces and Jobs into the PodIndex, and the IdentityLookup
the data plane uses.

Lookup order (`KubeIdentity`): the pod index first, then static identities. A pod IP is an
exact /32 or /128, as specific as any static CIDR can be, and static identities exist for
sources that are *not* pods (VMs, nodes: hostNetwork pods are never indexed, so a node's
address falls through to a static identity for the node range). An ambiguous pod IP is
refused; it never falls through to a static identity, since that would be a guess too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

import structlog

from proxy.control.kube.reflector import Resource
from proxy.core.hosts import IPAddress
from proxy.core.identity import IdentityLookup, Workload
from proxy.core.podindex import (
    IndexChange,
    LookupResult,
    PodDecodeError,
    PodIndex,
)
from proxy.metrics import IDENTITY_LOOKUPS, POD_IP_CONFLICTS

log = structlog.get_logger(__name__)

PODS: Final = Resource(name="pods", path="/api/v1/pods", kind="Pod")
NAMESPACES: Final = Resource(name="namespaces", path="/api/v1/namespaces", kind="Namespace")
JOBS: Final = Resource(name="jobs", path="/apis/batch/v1/jobs", kind="Job")

# Called for each IP whose attribution to a pod ended, with that pod's `namespace/name`.
SourceGone = Callable[[IPAddress, str], None]


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


class PodSink:
    """Pods, keyed by UID (rule 4 of proxy.core.podindex)."""

    def __init__(self, index: PodIndex, on_source_gone: SourceGone) -> None:
        self.index = index
        self._on_source_gone = on_source_gone

    def key(self, obj: dict[str, Any]) -> str | None:
        uid = _metadata(obj).get("uid")
        return uid if isinstance(uid, str) and uid else None

    def known_keys(self) -> Iterable[str]:
        return self.index.uids()

    def __len__(self) -> int:
        return len(self.index)

    def apply(self, obj: dict[str, Any]) -> None:
        try:
            pod = self.index.decode(obj)
        except PodDecodeError as exc:
            log.warning("kube_pod_undecodable", error=str(exc))
            return
        self._report(self.index.upsert(pod))

    def delete(self, key: str, obj: dict[str, Any] | None) -> None:
        self._report(self.index.remove(key))

    def _report(self, change: IndexChange) -> None:
        if not change:
            return
        for ip in change.conflicts:
            POD_IP_CONFLICTS.labels(kind="ambiguous").inc()
            log.warning(
                "pod_ip_ambiguous",
                ip=str(ip),
                claimants=[p.describe() for p in self.index.claimants(ip)],
                note="connections from this IP are refused until one claimant goes",
            )
        for ip in change.superseded:
            POD_IP_CONFLICTS.labels(kind="superseded").inc()
            log.info("pod_ip_superseded", ip=str(ip), claimant=self.index.lookup(ip).name)
        for ip, pod in change.released:
            self._on_source_gone(ip, pod.describe())


class NamespaceSink:
    """Namespace labels, keyed by name (names are unique at any one time)."""

    def __init__(self, index: PodIndex) -> None:
        self.index = index

    def key(self, obj: dict[str, Any]) -> str | None:
        name = _metadata(obj).get("name")
        return name if isinstance(name, str) and name else None

    def known_keys(self) -> Iterable[str]:
        return self.index.namespaces()

    def __len__(self) -> int:
        return self.index.namespace_count

    def apply(self, obj: dict[str, Any]) -> None:
        metadata = _metadata(obj)
        labels = metadata.get("labels")
        clean = {
            key: value
            for key, value in (labels.items() if isinstance(labels, dict) else ())
            if isinstance(key, str) and isinstance(value, str)
        }
        if self.index.set_namespace(str(metadata["name"]), clean):
            log.info("namespace_labels", namespace=metadata["name"], labels=clean)

    def delete(self, key: str, obj: dict[str, Any] | None) -> None:
        self.index.remove_namespace(key)


class JobSink:
    """Which CronJob controls each Job, keyed by `namespace/name` (a pod names its Job so)."""

    def __init__(self, index: PodIndex) -> None:
        self.index = index
        self._keys: set[str] = set()

    def key(self, obj: dict[str, Any]) -> str | None:
        metadata = _metadata(obj)
        namespace, name = metadata.get("namespace"), metadata.get("name")
        if not isinstance(namespace, str) or not isinstance(name, str) or not name:
            return None
        return f"{namespace}/{name}"

    def known_keys(self) -> Iterable[str]:
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def apply(self, obj: dict[str, Any]) -> None:
        metadata = _metadata(obj)
        cronjob: str | None = None
        for ref in metadata.get("ownerReferences") or ():
            if isinstance(ref, dict) and ref.get("controller") is True:
                if ref.get("kind") == "CronJob" and isinstance(ref.get("name"), str):
                    cronjob = ref["name"]
                break
        key = self.key(obj)
        assert key is not None  # the reflector only hands over objects that have a key
        self._keys.add(key)
        self.index.set_job(str(metadata["namespace"]), str(metadata["name"]), cronjob)

    def delete(self, key: str, obj: dict[str, Any] | None) -> None:
        self._keys.discard(key)
        namespace, _, name = key.partition("/")
        self.index.remove_job(namespace, name)


class KubeIdentity(IdentityLookup):
    """Pods first, then static identities (see the module docstring). Until the pod and
    namespace informers have synced, the pod index is not consulted (the proxy answers 503
    then anyway; /explain still shows static identities)."""

    def __init__(
        self, index: PodIndex, static: IdentityLookup, *, synced: Callable[[], bool]
    ) -> None:
        self.index = index
        self.static = static
        self._synced = synced
        self._ready = False  # informers never "unsync": once True, the check is skipped
        self._counters = {result: IDENTITY_LOOKUPS.labels(result=result) for result in LookupResult}

    def lookup(self, ip: IPAddress) -> Workload:
        if not self._ready:
            self._ready = self._synced()
            if not self._ready:
                self._counters[LookupResult.NOT_SYNCED].inc()
                return self.static.lookup(ip)
        result, workload = self.index.resolve(ip)
        self._counters[result].inc()
        if result is LookupResult.MISS:
            return self.static.lookup(ip)
        return workload
