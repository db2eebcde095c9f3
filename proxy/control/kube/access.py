"""What the proxy does with the Kubernetes API, and so what its RBAC grants: nothing more.

The shipped ClusterRole (manifests/base/rbac.yaml) is exactly `CLUSTER_GRANTS`;
tests/deploy/test_manifests.py holds the two in step, and checks that every reflector the
control plane can run is covered. docs/kubernetes.md gives each grant's reason, from `why`.
The real-API-server tier checks the API server's audit log for any other verb.

Reflectors only LIST and WATCH: an informer never needs `get`. Owners come from the pod's own
ownerReferences and the `pod-template-hash` label (ReplicaSet -> Deployment), so ReplicaSets,
whose pod templates hold literal environment values, are never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Grant:
    group: str  # "" is the core group
    resource: str
    verbs: tuple[str, ...]
    why: str


INFORMER_VERBS: Final = ("list", "watch")

CLUSTER_GRANTS: Final = (
    Grant("", "pods", INFORMER_VERBS, "source address -> pod: labels, owner, service account"),
    Grant("", "namespaces", INFORMER_VERBS, "namespace labels, for namespaceSelector"),
    Grant("batch", "jobs", INFORMER_VERBS, "Job -> CronJob, for the workload's owner name"),
    Grant("outgate.dev", "clusteregresspolicies", INFORMER_VERBS, "cluster policies"),
    Grant("outgate.dev", "egresspolicies", INFORMER_VERBS, "namespace policies"),
    Grant("", "events", ("create",), "an InvalidPolicy Event on an invalid policy object"),
)
