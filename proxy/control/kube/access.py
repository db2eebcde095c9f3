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
    names: tuple[str, ...] = ()  # resourceNames: only these objects


INFORMER_VERBS: Final = ("list", "watch")

CLUSTER_GRANTS: Final = (
    Grant("", "pods", INFORMER_VERBS, "source address -> pod: labels, owner, service account"),
    Grant("", "namespaces", INFORMER_VERBS, "namespace labels, for namespaceSelector"),
    Grant("batch", "jobs", INFORMER_VERBS, "Job -> CronJob, for the workload's owner name"),
    Grant("outgate.dev", "clusteregresspolicies", INFORMER_VERBS, "cluster policies"),
    Grant("outgate.dev", "egresspolicies", INFORMER_VERBS, "namespace policies"),
    Grant("", "events", ("create",), "an InvalidPolicy Event on an invalid policy object"),
    # Issue 18: the Accepted condition, by merge patch of the status subresource only (never
    # the object: the proxy cannot change a policy's spec).
    Grant(
        "outgate.dev",
        "clusteregresspolicies/status",
        ("patch",),
        "the Accepted condition of cluster policies (the Lease holder)",
    ),
    Grant(
        "outgate.dev",
        "egresspolicies/status",
        ("patch",),
        "the Accepted condition of namespace policies (the Lease holder)",
    ),
)

# The Role in the proxy's own namespace: the one Lease that elects the status writer
# (proxy.control.kube.lease). A create cannot be limited by resourceNames: its URL names no
# object (the name is in the body), so the authorizer has no name to match.
STATUS_LEASE_NAME: Final = "outgate-policy-status"  # proxy.config's policies.status.leaseName
LEASE_GRANTS: Final = (
    Grant(
        "coordination.k8s.io",
        "leases",
        ("get", "update"),
        "read, renew and take over the Lease that elects the one status writer",
        names=(STATUS_LEASE_NAME,),
    ),
    Grant(
        "coordination.k8s.io",
        "leases",
        ("create",),
        "create that Lease the first time (a create names no object the authorizer could match)",
    ),
)
