"""The audit record schema and the sink that writes it: one JSON line per decision and per close.

Field names follow the Elastic Common Schema (nested objects), so Fluent Bit, Vector or a SIEM
ingest the lines as they are. Records are rendered here with `json` rather than through
structlog because ECS's `event` object collides with structlog's reserved `event` key;
structlog renders the proxy's operational logs (stderr).

A record is never dropped. The event loop hands rendered lines to a writer thread that blocks on
stdout as long as it must; when more than `HIGH_WATER_BYTES` wait, `congested` turns true and the
listener stops serving new connections until the backlog falls under `LOW_WATER_BYTES`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from proxy import metrics
from proxy.core.identity import Workload, WorkloadKind
from proxy.core.policy.engine import Decision
from proxy.errors import Reason

# Raw client strings (paths, methods) are cut here: a record must stay one bounded line.
MAX_RAW_FIELD_CHARS = 1024
# 1 MiB of pending lines: a few thousand records, far more than a healthy collector lags.
HIGH_WATER_BYTES = 1 << 20
LOW_WATER_BYTES = 256 << 10


def new_event_id() -> str:
    """128 random bits: unique across replicas and restarts without coordination."""
    return secrets.token_hex(16)


def _cut(value: str | None) -> str | None:
    if value is None or len(value) <= MAX_RAW_FIELD_CHARS:
        return value
    return value[:MAX_RAW_FIELD_CHARS] + "...[truncated]"


@dataclass(slots=True, kw_only=True)
class Exchange:
    """What the data plane learns about one request or tunnel, in the order it learns it."""

    kind: str  # "tunnel" | "forward"
    source_ip: str
    source_port: int
    workload: Workload
    id: str = field(default_factory=new_event_id)
    started: float = field(default_factory=time.monotonic)
    destination_domain: str | None = None
    destination_ip: str | None = None
    destination_port: int | None = None
    method: str | None = None
    path: str | None = None
    server_name: str | None = None
    decision: Decision | None = None
    reason: Reason | None = None
    status: int | None = None
    source_bytes: int = 0  # bytes the client sent (ECS source.bytes)
    destination_bytes: int = 0  # bytes the upstream sent (ECS destination.bytes)
    decided: bool = False
    closed: bool = False


def _timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _common(ex: Exchange, action: str) -> dict[str, Any]:
    wl = ex.workload
    record: dict[str, Any] = {
        "@timestamp": _timestamp(),
        "event": {
            "kind": "event",
            "category": ["network"],
            "action": action,
            "id": ex.id,
            "dataset": "outgate.audit",
        },
        "source": {"ip": ex.source_ip, "port": ex.source_port},
        "destination": {
            "domain": ex.destination_domain,
            "ip": ex.destination_ip,
            "port": ex.destination_port,
        },
        "outgate": {"connection": ex.kind, "source_kind": str(wl.kind)},
    }
    if wl.kind is not WorkloadKind.UNKNOWN:
        record["kubernetes"] = {
            "namespace": wl.namespace,
            "pod": {"name": wl.name, "uid": wl.uid or None},
            "service_account": wl.service_account or None,
        }
        record["outgate"]["workload"] = (
            f"{wl.owner_kind}/{wl.owner_name}" if wl.owner_kind else None
        )
    if ex.server_name is not None:
        record["tls"] = {"client": {"server_name": _cut(ex.server_name)}}
    if ex.method is not None:
        record["http"] = {"request": {"method": _cut(ex.method)}}
    if ex.path is not None:
        record["url"] = {"path": _cut(ex.path)}
    return record


def decision_record(ex: Exchange) -> dict[str, Any]:
    """The record written once, when the request or tunnel is decided (or refused before that)."""
    record = _common(ex, "decision")
    decision = ex.decision
    allowed = decision is not None and decision.action == "allow" and ex.status is None
    outcome = "allow" if allowed else "deny"
    record["event"]["outcome"] = "success" if allowed else "failure"
    record["event"]["type"] = ["connection", "allowed" if allowed else "denied"]
    out = record["outgate"]
    out["decision"] = outcome
    out["reason"] = str(ex.reason) if ex.reason is not None else None
    if decision is not None:
        out["policy_revision"] = decision.revision
        if decision.shadow is not None:
            out["shadow_decision"] = str(decision.shadow.action)
            out["shadow_rule"] = decision.shadow.rule
            out["shadow_ruleset"] = decision.shadow.ruleset
        if decision.rule is not None:
            record["rule"] = {"name": decision.rule, "ruleset": decision.ruleset}
    if ex.status is not None:
        record["http"] = record.get("http", {})
        record["http"]["response"] = {"status_code": ex.status}
    return record


def close_record(ex: Exchange, reason: Reason) -> dict[str, Any]:
    """The record written once, when the request or tunnel ends: bytes, duration, status."""
    record = _common(ex, "close")
    record["event"]["outcome"] = "success" if reason is Reason.COMPLETED else "failure"
    record["event"]["type"] = ["connection", "end"]
    record["event"]["duration"] = int((time.monotonic() - ex.started) * 1e9)
    record["source"]["bytes"] = ex.source_bytes
    record["destination"]["bytes"] = ex.destination_bytes
    record["outgate"]["reason"] = str(reason)
    if ex.decision is not None:
        record["outgate"]["decision"] = str(ex.decision.action) if ex.decided else "deny"
        record["outgate"]["policy_revision"] = ex.decision.revision
        if ex.decision.rule is not None:
            record["rule"] = {"name": ex.decision.rule, "ruleset": ex.decision.ruleset}
    if ex.status is not None:
        record["http"] = record.get("http", {})
        record["http"]["response"] = {"status_code": ex.status}
    return record


def render(record: dict[str, Any]) -> bytes:
    """One line: ensure_ascii escapes CR, LF and every control or non-ASCII character."""
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


class AuditSink:
    """Ordered, lossless, non-blocking for the event loop; a thread does the blocking writes."""

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        self._lines: deque[bytes] = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_waiters: list[Callable[[], None]] = []
        self._congested_since: float | None = None
        self._thread.start()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def congested(self) -> bool:
        return self._pending > HIGH_WATER_BYTES

    def call_when_drained(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the event loop once the backlog is under the low-water mark."""
        self._drain_waiters.append(callback)

    def emit(self, record: dict[str, Any]) -> None:
        line = render(record)
        metrics.AUDIT_RECORDS.labels(action=record["event"]["action"]).inc()
        with self._cond:
            self._lines.append(line)
            self._pending += len(line)
            if self._pending > HIGH_WATER_BYTES and self._congested_since is None:
                self._congested_since = time.monotonic()
            self._cond.notify()

    def decision(self, ex: Exchange) -> None:
        self.emit(decision_record(ex))

    def close(self, ex: Exchange, reason: Reason) -> None:
        if ex.closed:
            return
        ex.closed = True
        self.emit(close_record(ex, reason))

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._closing:
                    self._cond.wait()
                if not self._lines and self._closing:
                    return
                batch = b"".join(self._lines)
                self._lines.clear()
            view = memoryview(batch)
            while view:
                try:
                    written = os.write(self._fd, view)
                except InterruptedError:
                    continue
                except BlockingIOError:
                    time.sleep(0.001)
                    continue
                view = view[written:]
            with self._cond:
                self._pending -= len(batch)
                drained = self._pending <= LOW_WATER_BYTES and self._congested_since is not None
                if drained and self._congested_since is not None:
                    metrics.AUDIT_BACKPRESSURE.inc(time.monotonic() - self._congested_since)
                    self._congested_since = None
            if drained and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._wake_drain_waiters)

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for callback in waiters:
            callback()

    def flush_and_stop(self, timeout: float = 10.0) -> None:
        """Write everything queued, then stop the writer thread (shutdown, tests)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
