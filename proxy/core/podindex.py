"""Source IP -> pod: the index the Kubernetes informer fills and the data plane reads (pure).

Rules (issue 3; each is a branch below):

  1. A record keeps only what decisions need: namespace, name, uid, labels, service account,
     owner, node, phase, terminating, hostNetwork, IPs, creation time. Everything else of the
     pod object is dropped when it is decoded, so 150,000 pods fit in a few hundred MB.
  2. IPs come from `status.podIPs` (dual stack: one IPv4 and one IPv6) or else `status.podIP`.
  3. Never indexed: hostNetwork pods (their IP is the node's, shared by every such pod and the
     kubelet), pods in phase Succeeded or Failed (their IP is free for reuse), pods without an IP.
  4. Records are keyed by pod UID, and removal is by UID: a late DELETE of an old pod never
     removes the new pod that took its IP, nor a StatefulSet pod recreated under the same name.
  5. When several pods claim one IP, a pod that is not terminating wins over terminating ones
     (the CNI may hand a terminating pod's IP to a new pod before the old object is gone). If
     more than one claimant is left, the IP is *ambiguous*: the data plane refuses it, because
     guessing would apply one workload's policy to another.
  6. The owner is the controller ownerReference; a ReplicaSet is resolved to its Deployment by
     the `pod-template-hash` label (the Deployment controller names a ReplicaSet
     `<deployment>-<hash>` and labels its pods with that hash), and a Job to its CronJob when the
     Job is known (joined at lookup, so a Job seen after its pods still resolves).
  7. Namespace labels are joined at lookup, so a label change on a namespace is in the very
     next decision without touching a single pod record.

Mutations return an `IndexChange` naming the IPs whose attribution to a pod ended: the caller
closes the connections from those IPs, since the address may already belong to someone else.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from proxy.core.hosts import IPAddress, unmap_ipv4
from proxy.core.identity import (
    EMPTY_LABELS,
    NAMESPACE_NAME_LABEL,
    UNKNOWN_WORKLOAD,
    FrozenLabels,
    IdentityLookup,
    Workload,
    WorkloadKind,
)

# Pods in these phases have stopped for good; the kubelet has released their IP.
TERMINAL_PHASES: Final = frozenset({"Succeeded", "Failed"})
# Set by the Deployment controller on every pod of a ReplicaSet it owns.
POD_TEMPLATE_HASH_LABEL: Final = "pod-template-hash"
# The API server defaults spec.serviceAccountName to this.
DEFAULT_SERVICE_ACCOUNT: Final = "default"

_V6_KEY_BIT: Final = 1 << 128  # keeps an IPv6 key apart from the IPv4 key of the same integer


class PodDecodeError(ValueError):
    """The object is not a pod this index can hold (no metadata.uid or name)."""


class LookupResult(StrEnum):
    """How a lookup ended; safe as a metric label."""

    HIT = "hit"
    MISS = "miss"
    AMBIGUOUS = "ambiguous"
    NOT_SYNCED = "not_synced"


@dataclass(frozen=True, slots=True, kw_only=True)
class PodRecord:
    namespace: str
    name: str
    uid: str
    labels: FrozenLabels = EMPTY_LABELS
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    owner_kind: str = ""  # after ReplicaSet -> Deployment; Job -> CronJob happens at lookup
    owner_name: str = ""
    node: str = ""
    phase: str = ""
    terminating: bool = False  # metadata.deletionTimestamp is set
    host_network: bool = False
    ips: tuple[IPAddress, ...] = ()
    created: str = ""  # metadata.creationTimestamp, RFC 3339 as the API wrote it

    @property
    def indexable(self) -> bool:
        """Rule 3: whether this pod may be found by its IP at all."""
        return bool(self.ips) and not self.host_network and self.phase not in TERMINAL_PHASES

    def describe(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class IndexChange:
    """What a mutation did to IP attribution."""

    # (ip, pod): the IP was attributed to that pod before, and is no more
    released: tuple[tuple[IPAddress, PodRecord], ...] = ()
    conflicts: tuple[IPAddress, ...] = ()  # became ambiguous (two live claimants)
    superseded: tuple[IPAddress, ...] = ()  # a live pod took it over from a terminating one

    def __bool__(self) -> bool:
        return bool(self.released or self.conflicts or self.superseded)


NO_CHANGE: Final = IndexChange()


# --------------------------------------------------------------------------------------------
# Decoding a pod object (JSON as the API serves it)
# --------------------------------------------------------------------------------------------


def _text(value: object) -> str:
    return sys.intern(value) if isinstance(value, str) else ""


def _parse_ip(value: object) -> IPAddress | None:
    if not isinstance(value, str):
        return None
    try:
        return unmap_ipv4(ipaddress.ip_address(value))
    except ValueError:
        return None


def pod_ips(status: Mapping[str, Any]) -> tuple[IPAddress, ...]:
    """Rule 2: `status.podIPs` (dual stack), else `status.podIP`; unparseable entries skipped."""
    found: list[IPAddress] = []
    pod_ips_field = status.get("podIPs")
    if isinstance(pod_ips_field, list):
        for entry in pod_ips_field:
            ip = _parse_ip(entry.get("ip")) if isinstance(entry, dict) else None
            if ip is not None and ip not in found:
                found.append(ip)
    if not found:
        ip = _parse_ip(status.get("podIP"))
        if ip is not None:
            found.append(ip)
    return tuple(found)


def controller_owner(owner_references: object, labels: Mapping[str, str]) -> tuple[str, str]:
    """Rule 6: (kind, name) of the controller ownerReference, ReplicaSet -> Deployment resolved;
    ("", "") for a pod no controller owns."""
    if not isinstance(owner_references, list):
        return "", ""
    for ref in owner_references:
        if not isinstance(ref, dict) or ref.get("controller") is not True:
            continue
        kind, name = ref.get("kind"), ref.get("name")
        if not isinstance(kind, str) or not isinstance(name, str):
            return "", ""
        if kind == "ReplicaSet":
            template_hash = labels.get(POD_TEMPLATE_HASH_LABEL)
            suffix = f"-{template_hash}"
            if template_hash and name.endswith(suffix) and len(name) > len(suffix):
                return "Deployment", sys.intern(name[: -len(suffix)])
        return sys.intern(kind), sys.intern(name)
    return "", ""


def _labels(raw: object) -> FrozenLabels:
    if not isinstance(raw, dict) or not raw:
        return EMPTY_LABELS
    return FrozenLabels(
        (key, value)
        for key, value in raw.items()
        if isinstance(key, str) and isinstance(value, str)
    )


def pod_from_object(
    obj: Mapping[str, Any], *, intern_labels: Callable[[FrozenLabels], FrozenLabels] | None = None
) -> PodRecord:
    """Rule 1: keep what decisions need, drop the rest. Raises PodDecodeError when the object
    has no uid or name (nothing could key it). `intern_labels` swaps a label set for an equal
    one already held (PodIndex.decode passes its own)."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        raise PodDecodeError("pod without metadata")
    uid, name = metadata.get("uid"), metadata.get("name")
    if not isinstance(uid, str) or not uid or not isinstance(name, str) or not name:
        raise PodDecodeError("pod without metadata.uid or metadata.name")
    spec = obj.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    status = obj.get("status")
    status = status if isinstance(status, dict) else {}
    labels = _labels(metadata.get("labels"))
    if intern_labels is not None:
        labels = intern_labels(labels)
    owner_kind, owner_name = controller_owner(metadata.get("ownerReferences"), labels)
    service_account = spec.get("serviceAccountName") or spec.get("serviceAccount")
    return PodRecord(
        namespace=_text(metadata.get("namespace")),
        name=name,
        uid=uid,
        labels=labels,
        service_account=_text(service_account) or DEFAULT_SERVICE_ACCOUNT,
        owner_kind=owner_kind,
        owner_name=owner_name,
        node=_text(spec.get("nodeName")),
        phase=_text(status.get("phase")),
        terminating=metadata.get("deletionTimestamp") is not None,
        host_network=spec.get("hostNetwork") is True,
        ips=pod_ips(status),
        created=_text(metadata.get("creationTimestamp")),
    )


# --------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------

_Claim = PodRecord | list[PodRecord]


class _Ambiguous:
    """Marker for an IP with more than one claimant left after rule 5."""


_AMBIGUOUS: Final = _Ambiguous()


def _ip_key(ip: IPAddress) -> int:
    if ip.__class__ is ipaddress.IPv4Address:  # the common case first: this is the hot path
        return int(ip)
    ip = unmap_ipv4(ip)
    return int(ip) if ip.version == 4 else int(ip) | _V6_KEY_BIT


def _winner(claim: _Claim) -> PodRecord | _Ambiguous:
    """Rule 5."""
    if isinstance(claim, PodRecord):
        return claim
    live = [pod for pod in claim if not pod.terminating]
    pool = live or claim
    return pool[0] if len(pool) == 1 else _AMBIGUOUS


class _LabelInterner:
    """One FrozenLabels object per distinct label set: the pods of one ReplicaSet share theirs.
    Reference-counted, so label sets of old rollouts (a new pod-template-hash each) are freed."""

    __slots__ = ("_table",)

    def __init__(self) -> None:
        self._table: dict[FrozenLabels, list[Any]] = {}  # labels -> [canonical, references]

    def acquire(self, labels: FrozenLabels) -> FrozenLabels:
        entry = self._table.get(labels)
        if entry is None:
            self._table[labels] = [labels, 1]
            return labels
        entry[1] += 1
        canonical: FrozenLabels = entry[0]
        return canonical

    def canonical(self, labels: FrozenLabels) -> FrozenLabels:
        """The held set equal to `labels`, or `labels` itself (no reference is taken)."""
        entry = self._table.get(labels)
        return labels if entry is None else entry[0]

    def release(self, labels: FrozenLabels) -> None:
        entry = self._table.get(labels)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._table[labels]

    def __len__(self) -> int:
        return len(self._table)


class PodIndex(IdentityLookup):
    """Pods by UID and by IP, namespaces' labels, Jobs' CronJobs. A lookup is one dict read
    whatever the number of pods: the Workload an IP resolves to is built on its first lookup and
    cached by IP until a pod claiming that IP, a namespace's labels or a Job change."""

    def __init__(self) -> None:
        self._by_uid: dict[str, PodRecord] = {}
        self._by_ip: dict[int, _Claim] = {}
        self._shared_ips: set[int] = set()  # keys whose claim is a list (two or more claimants)
        self._namespaces: dict[str, FrozenLabels] = {}
        self._cronjob_of_job: dict[tuple[str, str], str] = {}
        self._label_sets = _LabelInterner()
        self._resolved: dict[int, Workload] = {}  # IP key -> the workload of a hit

    # -- reading ---------------------------------------------------------------------------
    def lookup(self, ip: IPAddress) -> Workload:
        return self.resolve(ip)[1]

    def resolve(self, ip: IPAddress) -> tuple[LookupResult, Workload]:
        key = _ip_key(ip)
        cached = self._resolved.get(key)
        if cached is not None:
            return LookupResult.HIT, cached
        claim = self._by_ip.get(key)
        if claim is None:
            return LookupResult.MISS, UNKNOWN_WORKLOAD
        winner = _winner(claim)
        if isinstance(winner, _Ambiguous):
            assert isinstance(claim, list)
            return LookupResult.AMBIGUOUS, _ambiguous_workload(claim)
        workload = self._resolved[key] = self._workload(winner)
        return LookupResult.HIT, workload

    def _workload(self, pod: PodRecord) -> Workload:
        owner_kind, owner_name = pod.owner_kind, pod.owner_name
        if owner_kind == "Job":
            cronjob = self._cronjob_of_job.get((pod.namespace, owner_name))
            if cronjob is not None:
                owner_kind, owner_name = "CronJob", cronjob
        return Workload(
            kind=WorkloadKind.POD,
            namespace=pod.namespace,
            name=pod.name,
            uid=pod.uid,
            labels=pod.labels,
            namespace_labels=self._namespaces.get(pod.namespace, EMPTY_LABELS),
            service_account=pod.service_account,
            owner_kind=owner_kind,
            owner_name=owner_name,
        )

    def pod(self, uid: str) -> PodRecord | None:
        return self._by_uid.get(uid)

    def uids(self) -> Iterator[str]:
        return iter(list(self._by_uid))

    def claimants(self, ip: IPAddress) -> tuple[PodRecord, ...]:
        claim = self._by_ip.get(_ip_key(ip))
        if claim is None:
            return ()
        return (claim,) if isinstance(claim, PodRecord) else tuple(claim)

    def __len__(self) -> int:
        return len(self._by_uid)

    @property
    def ip_count(self) -> int:
        return len(self._by_ip)

    @property
    def ambiguous_ip_count(self) -> int:
        return sum(
            1 for key in self._shared_ips if isinstance(_winner(self._by_ip[key]), _Ambiguous)
        )

    @property
    def label_set_count(self) -> int:
        return len(self._label_sets)

    def namespace_labels(self, name: str) -> Mapping[str, str] | None:
        return self._namespaces.get(name)

    # -- pods ------------------------------------------------------------------------------
    def decode(self, obj: Mapping[str, Any]) -> PodRecord:
        """pod_from_object, sharing label sets this index already holds (the upsert that
        follows then need not copy the record to swap its labels)."""
        return pod_from_object(obj, intern_labels=self._label_sets.canonical)

    def upsert(self, pod: PodRecord) -> IndexChange:
        """Add or replace the pod with this UID; a pod that may not be indexed (rule 3) is
        removed instead."""
        if not pod.indexable:
            return self.remove(pod.uid)
        old = self._by_uid.get(pod.uid)
        if old is not None and old == pod:
            return NO_CHANGE
        touched = {_ip_key(ip): ip for ip in (*(old.ips if old else ()), *pod.ips)}
        before = {key: self._attribution(key) for key in touched}
        labels = self._label_sets.acquire(pod.labels)
        if labels is not pod.labels:
            pod = dataclasses.replace(pod, labels=labels)
        if old is not None:
            self._label_sets.release(old.labels)
            self._unclaim(old)
        self._by_uid[pod.uid] = pod
        for ip in pod.ips:
            self._claim(_ip_key(ip), pod)
        return self._change(touched, before)

    def remove(self, uid: str) -> IndexChange:
        """Rule 4: by UID only."""
        old = self._by_uid.pop(uid, None)
        if old is None:
            return NO_CHANGE
        touched = {_ip_key(ip): ip for ip in old.ips}
        before = {key: self._attribution(key) for key in touched}
        self._label_sets.release(old.labels)
        self._unclaim(old)
        return self._change(touched, before)

    def _claim(self, key: int, pod: PodRecord) -> None:
        claim = self._by_ip.get(key)
        if claim is None:
            self._by_ip[key] = pod
        elif isinstance(claim, PodRecord):
            self._by_ip[key] = [claim, pod]
            self._shared_ips.add(key)
        else:
            claim.append(pod)

    def _unclaim(self, pod: PodRecord) -> None:
        for ip in pod.ips:
            key = _ip_key(ip)
            claim = self._by_ip.get(key)
            if claim is None:
                continue
            if isinstance(claim, PodRecord):
                if claim.uid == pod.uid:
                    del self._by_ip[key]
                continue
            rest = [other for other in claim if other.uid != pod.uid]
            if len(rest) == 1:
                self._by_ip[key] = rest[0]
                self._shared_ips.discard(key)
            elif rest:
                self._by_ip[key] = rest
            else:  # pragma: no cover - a list always holds two or more
                del self._by_ip[key]
                self._shared_ips.discard(key)

    def _attribution(self, key: int) -> PodRecord | _Ambiguous | None:
        claim = self._by_ip.get(key)
        return None if claim is None else _winner(claim)

    def _change(
        self,
        touched: Mapping[int, IPAddress],
        before: Mapping[int, PodRecord | _Ambiguous | None],
    ) -> IndexChange:
        released: list[tuple[IPAddress, PodRecord]] = []
        conflicts: list[IPAddress] = []
        superseded: list[IPAddress] = []
        for key, ip in touched.items():
            self._resolved.pop(key, None)
            was, now = before[key], self._attribution(key)
            if isinstance(was, PodRecord):
                if isinstance(now, PodRecord) and now.uid == was.uid:
                    continue
                released.append((ip, was))
                still_there = self._by_uid.get(was.uid)
                if (
                    isinstance(now, PodRecord)
                    and still_there is not None
                    and still_there.terminating
                ):
                    superseded.append(ip)
            if isinstance(now, _Ambiguous) and not isinstance(was, _Ambiguous):
                conflicts.append(ip)
        if not (released or conflicts):
            return NO_CHANGE
        return IndexChange(
            released=tuple(released), conflicts=tuple(conflicts), superseded=tuple(superseded)
        )

    # -- namespaces and jobs ---------------------------------------------------------------
    def set_namespace(self, name: str, labels: Mapping[str, str]) -> bool:
        """Rule 7. True when the labels changed."""
        frozen = FrozenLabels({**labels, NAMESPACE_NAME_LABEL: name})
        if self._namespaces.get(name) == frozen:
            return False
        self._namespaces[sys.intern(name)] = frozen
        self._resolved.clear()  # rare; every cached workload is rebuilt on its next lookup
        return True

    def remove_namespace(self, name: str) -> bool:
        if self._namespaces.pop(name, None) is None:
            return False
        self._resolved.clear()
        return True

    def namespaces(self) -> Iterable[str]:
        return list(self._namespaces)

    @property
    def namespace_count(self) -> int:
        return len(self._namespaces)

    def set_job(self, namespace: str, name: str, cronjob: str | None) -> bool:
        """Rule 6: which CronJob (if any) controls Job `namespace/name`. True when it changed."""
        key = (namespace, name)
        if self._cronjob_of_job.get(key) == cronjob:
            return False
        if cronjob is None:
            del self._cronjob_of_job[key]
        else:
            self._cronjob_of_job[key] = sys.intern(cronjob)
        self._resolved.clear()
        return True

    def remove_job(self, namespace: str, name: str) -> bool:
        return self.set_job(namespace, name, None)


def _ambiguous_workload(claimants: list[PodRecord]) -> Workload:
    """Names every claimant (for the audit record and the 403 text); carries no labels, so no
    policy could select it even if it were ever decided."""
    namespaces = {pod.namespace for pod in claimants}
    if len(namespaces) == 1:
        namespace = next(iter(namespaces))
        names = sorted(pod.name for pod in claimants)
    else:
        namespace = ""
        names = sorted(pod.describe() for pod in claimants)
    return Workload(kind=WorkloadKind.AMBIGUOUS, namespace=namespace, name=",".join(names))
