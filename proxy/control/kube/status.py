"""`.status` of the policy objects: the `Accepted` condition, and the one writer that keeps it.

What an application team reads with `kubectl get egresspolicies` (the Accepted column) or
`kubectl describe`: whether the proxy enforces the object, and if not, why, in the words of
the validator that `outgate check-config` runs:

    status:
      observedGeneration: 4
      conditions:
      - type: Accepted
        status: "False"
        reason: InvalidPolicy
        message: 'Until this is fixed, ... (fail closed).
          EgressPolicy team/web: spec.rules[0].to[0].fqdn: ... -- fix: ...'
        observedGeneration: 4
        lastTransitionTime: "2026-01-02T03:04:05Z"

Rules:
  1. Only the replica holding the Lease writes (proxy.control.kube.lease), and only objects
     whose status does not already say what it would write: the informer's copy is compared
     first, so a steady cluster costs no writes, and a new holder rewrites only what is out
     of date.
  2. `lastTransitionTime` changes only when `status` (True/False) does; conditions of other
     types, written by someone else, are kept.
  3. Writes are merge patches of the status subresource, with the resourceVersion the
     decision was made on: an object changed since (409) or deleted (404) is not written;
     the informer's next event for it queues it again.
  4. A queue keyed by object coalesces: an object changed ten times while waiting is
     written once, with what holds then. Writes are paced at `writes_per_second`; a failed
     write is retried after `RETRY_SECONDS`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Protocol

import aiohttp
import structlog

from proxy.control.kube.client import ApiError, KubeClient
from proxy.errors import ConfigIssue
from proxy.metrics import POLICY_STATUS_WRITES

log = structlog.get_logger(__name__)

ACCEPTED: Final = "Accepted"
MERGE_PATCH: Final = "application/merge-patch+json"
# What an invalid object does meanwhile (docs/kubernetes.md, "Invalid objects fail closed"), first
# so that `kubectl describe` shows it even when the issues are long.
FAIL_CLOSED_NOTE: Final = (
    "Until this is fixed, the object denies every destination to the workloads it selects "
    "(fail closed)."
)
# metav1.Condition caps a message at 32768 characters; the API server refuses longer ones.
MAX_CONDITION_MESSAGE_CHARS: Final = 32768
VALID_MESSAGE: Final = "the policy is valid and in force"
# A write that failed (connection, 5xx, 403 until RBAC is fixed) is tried again this much later.
RETRY_SECONDS: Final = 10.0
# Objects compared with their status between two turns of the event loop (a few microseconds
# each): a new holder looking at ten thousand objects never holds up connections for long.
CHECKS_PER_YIELD: Final = 200
# How soon a holder that may not act yet (not renewed since a pause) looks at an object again.
RENEWAL_WAIT_SECONDS: Final = 1.0
# A thousand objects rewritten by a new holder take 200 s at this pace: slow enough that the
# API server never notices, fast enough for the one object a person just applied.
DEFAULT_WRITES_PER_SECOND: Final = 5.0


class AcceptedReason(StrEnum):
    """The condition's `reason` (CamelCase, as metav1.Condition requires)."""

    VALID = "Valid"
    INVALID = "InvalidPolicy"  # the validator refused it (also the Event's reason)
    NAME_CONFLICT = "NameConflict"  # a policy file of the same kind and name takes precedence


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    accepted: bool
    reason: AcceptedReason
    message: str

    @classmethod
    def valid(cls) -> Verdict:
        return cls(accepted=True, reason=AcceptedReason.VALID, message=VALID_MESSAGE)

    @classmethod
    def refused(cls, reason: AcceptedReason, issues: Iterable[ConfigIssue]) -> Verdict:
        message = "\n".join(issue.render() for issue in issues)
        if reason is AcceptedReason.INVALID:
            message = f"{FAIL_CLOSED_NOTE}\n{message}"
        if len(message) > MAX_CONDITION_MESSAGE_CHARS:
            message = message[: MAX_CONDITION_MESSAGE_CHARS - 3] + "..."
        return cls(accepted=False, reason=reason, message=message)


def utc_now() -> str:
    """metav1.Time: seconds, UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def desired_status(
    current: object, verdict: Verdict, generation: int, now: str
) -> dict[str, Any] | None:
    """The `.status` to write for `verdict` about `generation`, or None when `current` (the
    object's status as last read) already says all of it."""
    status = current if isinstance(current, dict) else {}
    raw = status.get("conditions")
    conditions = [c for c in raw if isinstance(c, dict)] if isinstance(raw, list) else []
    previous = next((c for c in conditions if c.get("type") == ACCEPTED), None)
    wanted: dict[str, Any] = {
        "type": ACCEPTED,
        "status": "True" if verdict.accepted else "False",
        "reason": str(verdict.reason),
        "message": verdict.message,
        "observedGeneration": generation,
    }
    if (
        previous is not None
        and all(previous.get(key) == value for key, value in wanted.items())
        and previous.get("lastTransitionTime")
        and status.get("observedGeneration") == generation
    ):
        return None
    kept = (
        previous is not None
        and previous.get("status") == wanted["status"]
        and isinstance(previous.get("lastTransitionTime"), str)
        and previous["lastTransitionTime"]
    )
    wanted["lastTransitionTime"] = previous["lastTransitionTime"] if kept and previous else now
    if previous is None:
        written = [*conditions, wanted]
    else:
        written = [wanted if c is previous else c for c in conditions]
    return {"observedGeneration": generation, "conditions": written}


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusTarget:
    """What the writer needs about one object: where its status is, the version the verdict
    was made on, the verdict, and the status as last read."""

    describe: str
    status_path: str
    resource_version: str
    generation: int
    verdict: Verdict
    status: Any


class StatusSubjects(Protocol):
    """The objects whose status is kept (proxy.control.kube.policies.KubePolicySource)."""

    def status_keys(self) -> Iterable[str]: ...

    def status_target(self, key: str) -> StatusTarget | None: ...

    def status_written(self, key: str, sent_version: str, obj: dict[str, Any]) -> None: ...


class PolicyStatusWriter:
    """Writes what `StatusSubjects` says is out of date, while `active` (holding the Lease)."""

    def __init__(
        self,
        client: KubeClient,
        subjects: StatusSubjects,
        *,
        writes_per_second: float = DEFAULT_WRITES_PER_SECOND,
        retry_seconds: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        """`may_write` is asked before every write (LeaseElector.may_act): being `active` is
        not enough after the process was paused."""
        self._client = client
        self._subjects = subjects
        self._interval = 1.0 / writes_per_second
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._may_write = may_write
        self.active = False
        self._ready: dict[str, None] = {}  # keys to look at, in order, each once
        self._retries: list[tuple[float, int, str]] = []  # (due, tie-break, key)
        self._sequence = itertools.count()
        self._wake = asyncio.Event()
        self._next_write = 0.0

    def set_active(self, active: bool) -> None:
        """Called when the Lease is gained or lost. Gained: every object is looked at once."""
        self.active = active
        self._ready.clear()
        self._retries.clear()
        if active:
            self._ready.update(dict.fromkeys(self._subjects.status_keys()))
        self._wake.set()

    def changed(self, key: str) -> None:
        """An object was applied, changed or installed: look at it again (if active)."""
        if self.active:
            self._ready[key] = None
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._ready) + len(self._retries)

    async def run(self) -> None:
        looked_at = 0
        while True:
            self._promote_due_retries()
            if not self._ready:
                await self._sleep_until_woken()
                continue
            key = next(iter(self._ready))
            del self._ready[key]
            if self._out_of_date(key) is None:  # deleted, not installed yet, or up to date
                looked_at += 1
                if looked_at % CHECKS_PER_YIELD == 0:
                    await asyncio.sleep(0)  # thousands of objects: let the data plane run
                continue
            delay = self._next_write - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            # Look again after the wait: the Lease may have gone or the object changed.
            found = self._out_of_date(key) if self.active else None
            if found is None:
                continue
            if not self._may_write():  # paused past the renew deadline: wait for a renewal
                self._retry(key, RENEWAL_WAIT_SECONDS)
                continue
            self._next_write = self._clock() + self._interval
            await self._write(key, *found)

    def _out_of_date(self, key: str) -> tuple[StatusTarget, dict[str, Any]] | None:
        target = self._subjects.status_target(key)
        if target is None:
            return None
        desired = desired_status(target.status, target.verdict, target.generation, utc_now())
        return None if desired is None else (target, desired)

    def _promote_due_retries(self) -> None:
        now = self._clock()
        while self._retries and self._retries[0][0] <= now:
            _, _, key = heapq.heappop(self._retries)
            if self.active:
                self._ready[key] = None

    async def _sleep_until_woken(self) -> None:
        self._wake.clear()
        timeout = self._retries[0][0] - self._clock() if self._retries else None
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _write(self, key: str, target: StatusTarget, status: dict[str, Any]) -> None:
        body = {"metadata": {"resourceVersion": target.resource_version}, "status": status}
        try:
            obj = await self._client.request_json(
                "PATCH", target.status_path, body=body, content_type=MERGE_PATCH
            )
        except ApiError as exc:
            if exc.status == 404:
                POLICY_STATUS_WRITES.labels(result="gone").inc()
                log.info(
                    "policy_status_gone",
                    object=target.describe,
                    note="deleted since it was read; if the object exists, its CRD lacks the "
                    "status subresource: apply manifests/base/crds",
                )
            elif exc.status == 409:
                POLICY_STATUS_WRITES.labels(result="conflict").inc()
            else:
                self._failed(key, target, f"{exc.status} {exc.reason}: {exc.message}"[:300])
                if exc.status == 403:
                    log.warning(
                        "policy_status_forbidden",
                        fix="grant patch on clusteregresspolicies/status and "
                        "egresspolicies/status (manifests/base/rbac.yaml), or set "
                        "policies.status.write: false",
                    )
            return
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._failed(key, target, f"{type(exc).__name__}: {exc}"[:300])
            return
        POLICY_STATUS_WRITES.labels(result="written").inc()
        log.info(
            "policy_status_written",
            object=target.describe,
            generation=target.generation,
            accepted=target.verdict.accepted,
            reason=str(target.verdict.reason),
        )
        if isinstance(obj, dict):
            self._subjects.status_written(key, target.resource_version, obj)

    def _failed(self, key: str, target: StatusTarget, error: str) -> None:
        POLICY_STATUS_WRITES.labels(result="failed").inc()
        log.warning("policy_status_write_failed", object=target.describe, error=error)
        self._retry(key, self._retry_seconds)

    def _retry(self, key: str, after: float) -> None:
        heapq.heappush(self._retries, (self._clock() + after, next(self._sequence), key))
