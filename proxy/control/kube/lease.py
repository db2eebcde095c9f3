"""One holder among the replicas, chosen with a coordination.k8s.io/v1 Lease (client-go's
leader election, the part the proxy needs: it decides who writes policy status).

The rules, as client-go's `leaderelection` package keeps them:

  1. No Lease: create it, holding it. A 409 means another replica created it first.
  2. We hold it: renew (PUT with the resourceVersion we read: a 409 means someone else wrote
     it since, and we read it again next round).
  3. Another holds it: wait until the record has not changed for `leaseDurationSeconds` *as
     measured by our own clock* since we first saw it so, then take it over (PUT with the
     resourceVersion, so of two replicas taking over at once one wins and one gets a 409).
     The holder's renewTime is never compared with our clock: clocks of two nodes differ.
  4. An empty holder (released by a holder that stopped cleanly) is taken at once.
  5. A holder that cannot renew for `renew_deadline` (shorter than the lease duration) stops
     acting as holder before anyone else may take over, so two never write at once.
  6. On a clean stop the holder releases the Lease (empty holder, 1 s duration), so the next
     replica takes over within one renew period instead of a whole lease duration.

`next_step` is the pure decision; `LeaseElector` does the requests.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import aiohttp
import structlog

from proxy.control.kube.client import ApiError, KubeClient
from proxy.metrics import POLICY_STATUS_LEADER

log = structlog.get_logger(__name__)

LEASE_API: Final = "/apis/coordination.k8s.io/v1"
# client-go's defaults are 15 s / 10 s / 2 s. A renew every 5 s costs one PUT per 5 s for the
# whole Deployment and still leaves two renewals' slack inside the deadline.
LEASE_DURATION_SECONDS: Final = 15
RENEW_DEADLINE_SECONDS: Final = 10.0
RENEW_PERIOD_SECONDS: Final = 5.0
# Non-holders retry with up to this fraction of the period added, so replicas that started
# together do not all ask in the same instant.
JITTER_FACTOR: Final = 0.2
# The release at shutdown must not hold up the drain.
RELEASE_TIMEOUT_SECONDS: Final = 2.0
# A released Lease: the duration client-go writes, so an older reader also sees it lapse soon.
RELEASED_DURATION_SECONDS: Final = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseTiming:
    duration_seconds: int = LEASE_DURATION_SECONDS  # leaseDurationSeconds: whole seconds
    renew_deadline: float = RENEW_DEADLINE_SECONDS
    renew_period: float = RENEW_PERIOD_SECONDS

    def __post_init__(self) -> None:
        if not 0 < self.renew_period < self.renew_deadline < self.duration_seconds:
            raise ValueError("0 < renew period < renew deadline < lease duration")


DEFAULT_LEASE_TIMING: Final = LeaseTiming()


class Step(StrEnum):
    CREATE = "create"
    RENEW = "renew"
    TAKE_OVER = "take_over"
    WAIT = "wait"


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRecord:
    """The Lease's spec, as read."""

    holder: str
    duration_seconds: float
    renew_time: str
    transitions: int

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> LeaseRecord:
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        assert isinstance(spec, dict)
        duration = spec.get("leaseDurationSeconds")
        transitions = spec.get("leaseTransitions")
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_seconds=float(duration) if isinstance(duration, int) else 0.0,
            renew_time=str(spec.get("renewTime") or ""),
            transitions=transitions if isinstance(transitions, int) else 0,
        )


def next_step(record: LeaseRecord | None, identity: str, *, unchanged_for: float) -> Step:
    """What to do with the Lease as read. `unchanged_for`: seconds, by our clock, since we first
    saw this record (holder and renewTime) as it is now."""
    if record is None:
        return Step.CREATE
    if record.holder == identity:
        return Step.RENEW
    if not record.holder or unchanged_for >= record.duration_seconds:
        return Step.TAKE_OVER
    return Step.WAIT


def holder_identity(environ: dict[str, str] | None = None) -> str:
    """The pod's name (POD_NAME, from the downward API; else the hostname, which is the pod's
    name in a pod) and a random suffix: every process is a distinct holder, also the worker
    processes of one pod (`workers` above 1) and a restarted container."""
    env = os.environ if environ is None else environ
    name = env.get("POD_NAME") or socket.gethostname()
    return f"{name}_{uuid.uuid4().hex[:10]}"


def micro_time() -> str:
    """metav1.MicroTime as the API server writes it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """Keeps trying to hold one Lease; `holding` says whether this process may act as holder.
    `on_change(holding)` is called on every change, on the event loop."""

    def __init__(
        self,
        client: KubeClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        on_change: Callable[[bool], None] = lambda holding: None,
        timing: LeaseTiming = DEFAULT_LEASE_TIMING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._client = client
        self.on_change = on_change
        self._duration = timing.duration_seconds
        self._renew_deadline = timing.renew_deadline
        self._renew_period = timing.renew_period
        self._clock = clock
        self.holding = False
        self._renewed_at = float("-inf")
        self._seen: tuple[str, str] | None = None  # (holder, renewTime) last read
        self._seen_since = 0.0

    def may_act(self) -> bool:
        """Holding, and renewed within the deadline *now*: a process that was paused (SIGSTOP,
        a long GC, a starved node) may still think it holds a Lease that another replica has
        taken over meanwhile; it must not act before it has renewed again."""
        return self.holding and self._clock() - self._renewed_at <= self._renew_deadline

    @property
    def _path(self) -> str:
        return f"{LEASE_API}/namespaces/{self.namespace}/leases/{self.name}"

    async def run(self) -> None:
        """Until cancelled: one attempt per period (renewals on time, others with jitter).
        Cancelling leaves `holding` as it is: `release` (at shutdown) gives the Lease up."""
        while True:
            await self.attempt()
            delay = self._renew_period
            if not self.holding:
                delay += random.uniform(0, JITTER_FACTOR * self._renew_period)  # noqa: S311
            await asyncio.sleep(delay)

    async def attempt(self) -> Step | None:
        """One read and, when due, one write. Returns the step taken (None: the API failed)."""
        try:
            step = await self._attempt()
        except (ApiError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            fix = None
            if isinstance(exc, ApiError) and exc.status == 403:
                fix = (
                    "apply the Role and RoleBinding outgate-policy-status of "
                    "manifests/base/rbac.yaml in this namespace, "
                    "or set policies.status.write: false"
                )
            log.warning("lease_attempt_failed", lease=self._describe(), error=_brief(exc), fix=fix)
            step = None
        if self.holding and self._clock() - self._renewed_at > self._renew_deadline:
            log.warning(
                "lease_lost", lease=self._describe(), reason="not renewed within the deadline"
            )
            self._set_holding(False)
        return step

    async def _attempt(self) -> Step:
        try:
            current: dict[str, Any] | None = await self._client.request_json("GET", self._path)
        except ApiError as exc:
            if exc.status != 404:
                raise
            current = None
        record = LeaseRecord.from_object(current) if current is not None else None
        now = self._clock()
        if record is not None:
            seen = (record.holder, record.renew_time)
            if seen != self._seen:
                self._seen, self._seen_since = seen, now
        step = next_step(record, self.identity, unchanged_for=now - self._seen_since)
        if step is Step.WAIT:
            if self.holding:
                log.warning("lease_lost", lease=self._describe(), holder=record and record.holder)
                self._set_holding(False)
            return step
        stamp = micro_time()
        try:
            if step is Step.CREATE:
                await self._client.request_json(
                    "POST",
                    f"{LEASE_API}/namespaces/{self.namespace}/leases",
                    body=self._lease(stamp, acquired=stamp, transitions=0),
                )
            else:
                assert current is not None and record is not None
                metadata = current.get("metadata") or {}
                spec = current.get("spec") or {}
                acquired = spec.get("acquireTime") if step is Step.RENEW else stamp
                transitions = record.transitions + (step is Step.TAKE_OVER)
                body = self._lease(stamp, acquired=acquired or stamp, transitions=transitions)
                body["metadata"]["resourceVersion"] = metadata.get("resourceVersion")
                await self._client.request_json("PUT", self._path, body=body)
        except ApiError as exc:
            if exc.status == 409:  # another replica wrote first: read again next round
                log.info("lease_conflict", lease=self._describe(), step=str(step))
                return Step.WAIT
            raise
        self._renewed_at = self._clock()
        if not self.holding:
            log.info("lease_acquired", lease=self._describe(), identity=self.identity, step=step)
        self._set_holding(True)
        return step

    async def release(self) -> None:
        """Give the Lease up (a clean stop), so another replica takes over at its next try."""
        if not self.holding:
            return
        self._set_holding(False)
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                current = await self._client.request_json("GET", self._path)
                if LeaseRecord.from_object(current).holder != self.identity:
                    return
                stamp = micro_time()
                body = self._lease(
                    stamp,
                    acquired=stamp,
                    transitions=LeaseRecord.from_object(current).transitions,
                    holder="",
                    duration=RELEASED_DURATION_SECONDS,
                )
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                await self._client.request_json("PUT", self._path, body=body)
            log.info("lease_released", lease=self._describe())
        except (ApiError, aiohttp.ClientError, TimeoutError, KeyError, TypeError) as exc:
            log.warning("lease_release_failed", lease=self._describe(), error=_brief(exc))

    def _lease(
        self,
        stamp: str,
        *,
        acquired: str,
        transitions: int,
        holder: str | None = None,
        duration: int | None = None,
    ) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity if holder is None else holder,
                "leaseDurationSeconds": self._duration if duration is None else duration,
                "acquireTime": acquired,
                "renewTime": stamp,
                "leaseTransitions": transitions,
            },
        }

    def _set_holding(self, holding: bool) -> None:
        if holding == self.holding:
            return
        self.holding = holding
        POLICY_STATUS_LEADER.set(1 if holding else 0)
        self.on_change(holding)

    def _describe(self) -> str:
        return f"{self.namespace}/{self.name}"


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
