"""ClusterEgressPolicy / EgressPolicy objects from the cluster, merged with the file policies.

Both custom resources (group outgate.dev, version v1alpha1) are watched by the same reflector
as pods. Each object is validated by the loader that validates files (same messages, same
field paths). The set in force is recompiled, merged with the file policies, a short moment
after the last change (`DEBOUNCE_SECONDS`: a relist of a thousand objects compiles once).

An invalid object fails closed: a stand-in (proxy.core.policy.loader.fail_closed_policy) takes
its place and denies everything at the object's place in the order, for the object's subjects,
with reason `policy_invalid` naming it. Leaving it out would drop any Deny it held (an invalid
edit of an admin-tier deny would open what it denied). Not "the last valid version of it"
either: replicas that started at different times would then enforce different policies for the
same workload, and a restart would silently change the decision; the stand-in depends on the
stored object alone, so every replica decides the same. The person who applied it sees why on
the object itself (`kubectl describe`): a Warning Event, reason `InvalidPolicy`, whose message is
the rendered issues; the log and `outgate_kube_invalid_policies` say it too, and /readyz lists
it. The Event's name is derived from the object's UID, generation and message, so every replica
posting the same finding collides on one name (409) instead of piling up copies.

Each object also carries the finding in `.status` (condition `Accepted`, reason and message
as above, `observedGeneration`), written by the replica holding the policy-status Lease:
proxy.control.kube.status. This module says what each object's verdict is, once the set it
belongs to is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

import structlog

from proxy.control.kube.client import ApiError, KubeClient
from proxy.control.kube.reflector import DEFAULT_TUNING, Reflector, ReflectorTuning, Resource
from proxy.control.kube.status import AcceptedReason, StatusTarget, Verdict
from proxy.control.policy_source import KUBERNETES_SOURCE, PolicyStore
from proxy.core.policy.loader import fail_closed_policy, load_text
from proxy.core.policy.model import API_VERSION, Origin, Policy, PolicyKind
from proxy.errors import ConfigError, ConfigIssue
from proxy.metrics import (
    KUBE_EVENTS_POSTED,
    KUBE_INVALID_POLICIES,
    POLICY_REVISION,
    POLICY_RULES,
)

log = structlog.get_logger(__name__)

_GROUP_PATH: Final = "/apis/" + API_VERSION
CLUSTER_POLICIES: Final = Resource(
    name="clusteregresspolicies",
    path=f"{_GROUP_PATH}/clusteregresspolicies",
    kind=PolicyKind.CLUSTER.value,
)
NAMESPACED_POLICIES: Final = Resource(
    name="egresspolicies", path=f"{_GROUP_PATH}/egresspolicies", kind=PolicyKind.NAMESPACED.value
)
# Long enough to fold a relist's burst of events into one compile, short enough that an
# applied policy is in force well within a second.
DEBOUNCE_SECONDS: Final = 0.1
INVALID_POLICY_REASON: Final = "InvalidPolicy"
# events.k8s.io caps a note at 1 KiB; core/v1 Events are shown the same way by kubectl.
MAX_EVENT_MESSAGE_BYTES: Final = 1024
# Events for cluster-scoped objects go to "default", where `kubectl describe` looks for them.
CLUSTER_EVENT_NAMESPACE: Final = "default"
# Pending Events beyond this are dropped (and counted): a flood of invalid objects must not
# grow memory or block the informer.
MAX_PENDING_EVENTS: Final = 256
# Findings remembered so each is posted once per process; past this the memory starts over
# (a finding posted again collides on its name, 409, and costs one request).
MAX_REMEMBERED_EVENTS: Final = 4096
EVENT_COMPONENT: Final = "outgate"


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectRef:
    kind: PolicyKind
    namespace: str
    name: str
    uid: str
    resource_version: str
    generation: str

    def describe(self) -> str:
        return (
            f"{self.kind} {self.namespace}/{self.name}"
            if self.namespace
            else (f"{self.kind} {self.name}")
        )

    @property
    def status_path(self) -> str:
        resource = CLUSTER_POLICIES if self.kind is PolicyKind.CLUSTER else NAMESPACED_POLICIES
        where = f"/namespaces/{self.namespace}" if self.namespace else ""
        return f"{_GROUP_PATH}{where}/{resource.name}/{self.name}/status"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Entry:
    ref: ObjectRef
    policy: Policy | None  # None: the object is invalid
    issues: tuple[ConfigIssue, ...] = ()
    status: Any = None  # the object's .status as last read (or written)
    stand_in: Policy | None = None  # in force in place of an invalid object

    @property
    def in_force(self) -> Policy | None:
        return self.policy if self.policy is not None else self.stand_in


def policy_from_object(
    kind: PolicyKind, obj: dict[str, Any]
) -> tuple[Policy | None, list[ConfigIssue]]:
    """Validate one object as the loader validates a file document. The server-set metadata
    (uid, managedFields, finalizers...) is not the author's and is not validated."""
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    assert isinstance(metadata, dict)
    document: dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind.value}
    document["metadata"] = {key: metadata[key] for key in ("name", "namespace") if key in metadata}
    if "spec" in obj:
        document["spec"] = obj["spec"]
    ref = object_ref(kind, obj)
    try:
        # JSON is YAML: the loader reads it unchanged, so messages and paths match files'.
        policies = load_text(json.dumps(document), file=ref.describe())
    except ConfigError as error:
        return None, error.issues
    return policies[0], []


def stand_in_for(
    kind: PolicyKind, obj: dict[str, Any], issues: Iterable[ConfigIssue]
) -> Policy | None:
    """The fail-closed stand-in for an invalid object; None only for an object with no usable
    name (the API server never stores one)."""
    ref = object_ref(kind, obj)
    try:
        return fail_closed_policy(
            kind,
            obj.get("spec"),
            name=ref.name,
            namespace=ref.namespace,
            issues=list(issues),
            origin=Origin(file=ref.describe(), document=1),
        )
    except ValueError as exc:
        log.error("kube_policy_stand_in_failed", object=ref.describe(), error=str(exc))
        return None


def object_ref(kind: PolicyKind, obj: dict[str, Any]) -> ObjectRef:
    metadata = obj.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    return ObjectRef(
        kind=kind,
        namespace=str(metadata.get("namespace") or ""),
        name=str(metadata.get("name") or ""),
        uid=str(metadata.get("uid") or ""),
        resource_version=str(metadata.get("resourceVersion") or ""),
        generation=str(metadata.get("generation") or metadata.get("resourceVersion") or ""),
    )


class _PolicySink:
    def __init__(self, source: KubePolicySource, kind: PolicyKind) -> None:
        self._source = source
        self._kind = kind

    def key(self, obj: dict[str, Any]) -> str | None:
        metadata = obj.get("metadata")
        uid = metadata.get("uid") if isinstance(metadata, dict) else None
        return uid if isinstance(uid, str) and uid else None

    def known_keys(self) -> Iterable[str]:
        return [uid for uid, entry in self._source.entries.items() if entry.ref.kind is self._kind]

    def __len__(self) -> int:
        return sum(1 for entry in self._source.entries.values() if entry.ref.kind is self._kind)

    def apply(self, obj: dict[str, Any]) -> None:
        self._source.apply(self._kind, obj)

    def delete(self, key: str, obj: dict[str, Any] | None) -> None:
        self._source.remove(key)


class EventReporter:
    """Posts core/v1 Events about policy objects, from a bounded queue, off the informer path."""

    def __init__(self, client: KubeClient, *, instance: str | None = None) -> None:
        self._client = client
        self._instance = instance or socket.gethostname()
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_PENDING_EVENTS)
        self._posted: set[str] = set()

    def invalid_policy(self, ref: ObjectRef, message: str) -> None:
        digest = hashlib.sha256(f"{ref.uid}/{ref.generation}/{message}".encode()).hexdigest()
        name = f"{ref.name}.{digest[:16]}"
        if name in self._posted:
            return
        if len(self._posted) >= MAX_REMEMBERED_EVENTS:
            self._posted.clear()
        self._posted.add(name)
        namespace = ref.namespace or CLUSTER_EVENT_NAMESPACE
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        involved: dict[str, str] = {
            "apiVersion": API_VERSION,
            "kind": ref.kind.value,
            "name": ref.name,
            "uid": ref.uid,
            "resourceVersion": ref.resource_version,
        }
        if ref.namespace:
            involved["namespace"] = ref.namespace
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": involved,
            "reason": INVALID_POLICY_REASON,
            "message": _cut_utf8(message, MAX_EVENT_MESSAGE_BYTES),
            "type": "Warning",
            "action": "Validate",
            "source": {"component": EVENT_COMPONENT},
            "reportingComponent": f"{API_VERSION.split('/')[0]}/{EVENT_COMPONENT}",
            "reportingInstance": self._instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            KUBE_EVENTS_POSTED.labels(result="dropped").inc()

    async def run(self) -> None:
        while True:
            event = await self._queue.get()
            namespace = event["metadata"]["namespace"]
            try:
                await self._client.request_json(
                    "POST", f"/api/v1/namespaces/{namespace}/events", body=event
                )
                KUBE_EVENTS_POSTED.labels(result="created").inc()
            except ApiError as exc:
                if exc.status == 409:  # another replica posted the same finding
                    KUBE_EVENTS_POSTED.labels(result="exists").inc()
                    continue
                KUBE_EVENTS_POSTED.labels(result="failed").inc()
                log.warning(
                    "kube_event_post_failed",
                    status=exc.status,
                    reason=exc.reason,
                    message=exc.message[:300],
                    about=event["involvedObject"]["name"],
                )
            except Exception as exc:  # connection trouble: the log line stays the record
                KUBE_EVENTS_POSTED.labels(result="failed").inc()
                log.warning("kube_event_post_failed", error=f"{type(exc).__name__}: {exc}"[:300])


class KubePolicySource:
    """Watches both policy kinds and keeps the `kubernetes` source of the PolicyStore current."""

    def __init__(
        self,
        client: KubeClient,
        store: PolicyStore,
        *,
        reporter: EventReporter | None = None,
        tuning: ReflectorTuning = DEFAULT_TUNING,
        debounce: float = DEBOUNCE_SECONDS,
    ) -> None:
        self.store = store
        self.entries: dict[str, _Entry] = {}
        self.reporter = reporter
        self._debounce = debounce
        self._dirty = asyncio.Event()
        self._installed = False
        self._shadow_reported: set[tuple[str, str]] = set()
        # uid -> (generation, verdict) as of the last install; the status writer's input.
        self._verdicts: dict[str, tuple[str, Verdict]] = {}
        # Told the uid of every object applied or installed (the status writer's `changed`).
        self.status_changed: Callable[[str], None] = lambda uid: None
        self._loop: asyncio.AbstractEventLoop | None = None
        store.on_merge(self._merged)
        self.reflectors = [
            Reflector(
                client,
                resource,
                _PolicySink(self, kind),
                tuning=tuning,
                on_synced=self._dirty.set,
            )
            for resource, kind in (
                (CLUSTER_POLICIES, PolicyKind.CLUSTER),
                (NAMESPACED_POLICIES, PolicyKind.NAMESPACED),
            )
        ]

    @property
    def synced(self) -> bool:
        """Both kinds listed and the result installed: only then is the policy complete."""
        return self._installed

    def invalid(self) -> list[str]:
        return [
            f"{entry.ref.describe()}: {len(entry.issues)} issue(s)"
            for entry in self.entries.values()
            if entry.policy is None
        ]

    # -- sink side -----------------------------------------------------------------------
    def apply(self, kind: PolicyKind, obj: dict[str, Any]) -> None:
        ref = object_ref(kind, obj)
        previous = self.entries.get(ref.uid)
        status = obj.get("status")
        if previous is not None and previous.ref.generation == ref.generation:
            # Only metadata or status changed (labels, annotations): the spec is the same.
            self.entries[ref.uid] = replace(previous, ref=ref, status=status)
            self.status_changed(ref.uid)  # a status someone else changed is put right
            return
        policy, issues = policy_from_object(kind, obj)
        stand_in = None
        if policy is None:
            stand_in = stand_in_for(kind, obj, issues)
            self._report(ref, issues)
        self.entries[ref.uid] = _Entry(
            ref=ref, policy=policy, issues=tuple(issues), status=status, stand_in=stand_in
        )
        self._dirty.set()

    def remove(self, uid: str) -> None:
        self._verdicts.pop(uid, None)
        if self.entries.pop(uid, None) is not None:
            self._dirty.set()

    # -- status (proxy.control.kube.status.StatusSubjects) -----------------------------------
    def status_keys(self) -> Iterable[str]:
        return list(self._verdicts)

    def status_target(self, uid: str) -> StatusTarget | None:
        """None until the object's current generation is installed (the verdict is about the
        set in force), and for an object whose generation is not a number."""
        entry, found = self.entries.get(uid), self._verdicts.get(uid)
        if entry is None or found is None or found[0] != entry.ref.generation:
            return None
        generation, verdict = found
        if not generation.isdigit():
            return None
        return StatusTarget(
            describe=entry.ref.describe(),
            status_path=entry.ref.status_path,
            resource_version=entry.ref.resource_version,
            generation=int(generation),
            verdict=verdict,
            status=entry.status,
        )

    def status_written(self, uid: str, sent_version: str, obj: dict[str, Any]) -> None:
        """Our own write, as the server answered it. Kept only if no newer event came
        meanwhile (the entry still has the version we wrote on)."""
        entry = self.entries.get(uid)
        if entry is None or entry.ref.resource_version != sent_version:
            return
        metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        assert isinstance(metadata, dict)
        version = str(metadata.get("resourceVersion") or entry.ref.resource_version)
        self.entries[uid] = replace(
            entry,
            ref=replace(entry.ref, resource_version=version),
            status=obj.get("status"),
        )

    def _report(self, ref: ObjectRef, issues: Iterable[ConfigIssue]) -> None:
        rendered = [issue.render() for issue in issues]
        log.error("kube_policy_invalid", object=ref.describe(), uid=ref.uid, issues=rendered)
        if self.reporter is not None:
            self.reporter.invalid_policy(ref, "\n".join(rendered))

    # -- install -------------------------------------------------------------------------
    def _merged(self, source: str) -> None:
        """The files changed (on the watcher's thread): an object a file policy shadowed may
        be in force now, or the other way round. Install again, so that verdicts, status and
        Events say so."""
        loop = self._loop
        if source == KUBERNETES_SOURCE or loop is None or not self._installed:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: the proxy is stopping
            loop.call_soon_threadsafe(self._dirty.set)

    async def run(self) -> None:
        """Recompile after changes, once both kinds have synced. Runs until cancelled."""
        self._loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._debounce)
            self._dirty.clear()
            if all(reflector.synced for reflector in self.reflectors):
                self.install()

    def install(self) -> None:
        policies = [p for e in self.entries.values() if (p := e.in_force) is not None]
        engine, shadowed = self.store.set_source(KUBERNETES_SOURCE, policies)
        self._installed = True
        POLICY_REVISION.set(engine.revision)
        POLICY_RULES.set(engine.rule_count)
        for kind in PolicyKind:
            KUBE_INVALID_POLICIES.labels(kind=kind.value).set(
                sum(1 for e in self.entries.values() if e.ref.kind is kind and e.policy is None)
            )
        verdicts = {
            uid: (
                entry.ref.generation,
                Verdict.valid()
                if entry.policy is not None
                else Verdict.refused(AcceptedReason.INVALID, entry.issues),
            )
            for uid, entry in self.entries.items()
        }
        by_policy = {id(e.policy): e for e in self.entries.values() if e.policy is not None}
        for left_out, first in shadowed:
            found = by_policy.get(id(left_out))
            if found is None:
                continue
            ref = found.ref
            issue = ConfigIssue(
                file=ref.describe(),
                document=None,
                path="metadata.name",
                message=f"a policy of this name is already defined in {first.origin}, "
                "which takes precedence; this object is left out",
                fix="rename the object, or remove the policy from the proxy's files",
            )
            verdicts[ref.uid] = (
                ref.generation,
                Verdict.refused(AcceptedReason.NAME_CONFLICT, [issue]),
            )
            if (ref.uid, ref.generation) not in self._shadow_reported:
                self._shadow_reported.add((ref.uid, ref.generation))
                self._report(ref, [issue])
        self._verdicts = verdicts
        for uid in verdicts:
            self.status_changed(uid)
        log.info(
            "kube_policies_installed",
            revision=engine.revision,
            digest=engine.digest,
            policies=len(policies) - len(shadowed),
            invalid=sum(1 for e in self.entries.values() if e.policy is None),
            left_out_as_duplicates=len(shadowed),
        )


def _cut_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "..."
