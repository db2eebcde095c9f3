"""A reflector with client-go's list/watch semantics, feeding a `Sink`.

The loop, step by step:

  1. LIST in pages (`limit=500`, then `continue`). Each page is applied as it arrives (no
     150,000-object list is ever held at once). A continue token that expired (410 on a
     `continue` request) restarts the list from its first page. When the list is complete,
     every key the sink holds that the list did not name is deleted: the deletion of an object
     that went while no watch was open is *synthesised* here, exactly as client-go's
     DeltaFIFO.Replace does, so no stale pod keeps an IP.
  2. WATCH from the list's resourceVersion with `allowWatchBookmarks=true` and a randomised
     `timeoutSeconds` (so a thousand proxies do not all re-watch in the same second).
     resourceVersions are opaque strings: stored and sent back, never parsed or compared.
  3. Each line is one event. ADDED/MODIFIED/DELETED go to the sink; BOOKMARK only moves the
     resourceVersion; ERROR with code 410 (history compacted) -> back to step 1 at once;
     another ERROR -> backoff, watch again. An unknown type is counted and skipped
     (forward-compatible); a line that is not JSON ends the watch (the stream is suspect).
  4. A clean close (the server's timeout) -> watch again from the last resourceVersion seen,
     at once. A watch that closed within a second having delivered nothing is not "clean"
     but a failure (client-go's "very short watch"), so a server closing every watch at once
     is met with backoff, not a request spin.
  5. No line for `inactivity_timeout` (not even a bookmark) -> the connection is presumed
     dead (a NAT or load balancer dropped it silently): reconnect from the last version.
  6. Errors (connection, 5xx, 403) back off exponentially with jitter; a 429 waits at least
     its Retry-After; an HTTP 410 on the watch request relists at once.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

import aiohttp
import structlog

from proxy.control.kube.client import (
    MAX_WATCH_LINE_BYTES,
    ApiError,
    KubeClient,
    LineTooLong,
    WatchInactive,
    WatchStreamError,
)
from proxy.metrics import (
    KUBE_API_ERRORS,
    KUBE_EVENTS,
    KUBE_OBJECTS,
    KUBE_RELISTS,
    KUBE_SECONDS_SINCE_EVENT,
    KUBE_SYNCED,
    KUBE_WATCH_RESTARTS,
)

log = structlog.get_logger(__name__)

_EVENT_TYPES: Final = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})
# A continue token that keeps expiring (a list slower than etcd's compaction interval) is
# retried this many times before the reflector backs off and starts over.
_MAX_CONTINUE_RESTARTS: Final = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class Resource:
    name: str  # plural, the metric label: "pods"
    path: str  # the collection: "/api/v1/pods"
    kind: str  # "Pod"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReflectorTuning:
    # client-go's pager default; the API server serves a page of 500 pods in tens of ms.
    page_size: int = 500
    # client-go: timeoutSeconds is uniformly random in [5 min, 10 min).
    watch_timeout_seconds: float = 300.0
    # The API server sends a bookmark about once a minute on an idle watch; two and a half
    # missed bookmarks mean the connection is gone, whatever TCP thinks.
    inactivity_timeout: float = 150.0
    # client-go: a watch that ends within a second with no event is an error ("very short").
    min_watch_seconds: float = 1.0
    # client-go's reflector backoff: 800 ms doubling to 30 s, with jitter.
    backoff_initial: float = 0.8
    backoff_max: float = 30.0
    max_line_bytes: int = MAX_WATCH_LINE_BYTES


DEFAULT_TUNING: Final = ReflectorTuning()


class Sink(Protocol):
    """Where a reflector puts what it learns. `key` names an object (a pod's UID, a namespace's
    name); `known_keys` are the keys the sink holds now, for the deletions a relist synthesises."""

    def key(self, obj: dict[str, Any]) -> str | None: ...

    def known_keys(self) -> Iterable[str]: ...

    def apply(self, obj: dict[str, Any]) -> None: ...

    def delete(self, key: str, obj: dict[str, Any] | None) -> None: ...

    def __len__(self) -> int: ...


class SyncListener(Protocol):
    def __call__(self) -> None: ...


class Restart(StrEnum):
    """Why a watch ended (the metric label)."""

    CLOSED = "closed"
    EXPIRED = "expired"
    INACTIVE = "inactive"
    TOO_SHORT = "too_short"
    ERROR = "error"
    MALFORMED = "malformed"
    LINE_TOO_LONG = "line_too_long"
    API_ERROR = "api_error"


class Backoff:
    """Exponential backoff with "equal jitter": each delay is uniform in [d/2, d], d doubling
    from `initial` up to `maximum`. A Retry-After is honoured as a floor."""

    def __init__(self, initial: float, maximum: float, *, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._current = initial

    def next(self, retry_after: float | None = None) -> float:
        ceiling = min(self._current, self.maximum)
        self._current = min(self._current * 2, self.maximum)
        delay = ceiling / 2 + self._rng.random() * ceiling / 2
        return max(delay, retry_after or 0.0)

    def reset(self) -> None:
        self._current = self.initial


class Reflector:
    """Keeps a Sink in step with one resource of the API server. `run()` until cancelled."""

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        sink: Sink,
        *,
        tuning: ReflectorTuning = DEFAULT_TUNING,
        on_synced: SyncListener | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.sink = sink
        self.tuning = tuning
        self._on_synced = on_synced
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._backoff = Backoff(tuning.backoff_initial, tuning.backoff_max, rng=self._rng)
        self.resource_version = ""
        self.synced = False
        self._synced_event = asyncio.Event()
        self.last_activity = time.monotonic()
        self.relists = 0
        self.watches = 0
        self._events_since_list = 0
        self._watch_events = 0
        label = resource.name
        self._events = {
            kind: KUBE_EVENTS.labels(resource=label, type=kind) for kind in _EVENT_TYPES
        }
        self._objects = KUBE_OBJECTS.labels(resource=label)
        self._age = KUBE_SECONDS_SINCE_EVENT.labels(resource=label)
        KUBE_SYNCED.labels(resource=label).set(0)

    def publish_age(self) -> None:
        """Set the seconds-since-last-event gauge (a ticker calls this: values are written,
        not computed at scrape time, so `workers` processes can share them)."""
        self._age.set(time.monotonic() - self.last_activity)

    async def wait_synced(self) -> None:
        await self._synced_event.wait()

    # -- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        list_reason: str | None = "initial"
        name = self.resource.name
        while True:
            delay = 0.0
            restart: Restart | None = None
            try:
                if list_reason is not None:
                    await self._list(list_reason)
                    list_reason = None
                restart = await self._watch()
            except ApiError as exc:
                KUBE_API_ERRORS.labels(resource=name, status=str(exc.status)).inc()
                if exc.status == 410 and list_reason is None:
                    restart = Restart.EXPIRED  # an HTTP 410 on the watch request itself
                else:
                    delay = self._backoff.next(exc.retry_after)
                    log.warning(
                        "kube_api_error",
                        resource=name,
                        status=exc.status,
                        reason=exc.reason,
                        message=exc.message[:300],
                        retry_in=round(delay, 3),
                    )
                    if list_reason is None:
                        restart = Restart.API_ERROR
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                # ValueError: a LIST answer that is not JSON.
                KUBE_API_ERRORS.labels(resource=name, status="connection").inc()
                delay = self._backoff.next()
                log.warning(
                    "kube_connection_error",
                    resource=name,
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    retry_in=round(delay, 3),
                )
                if list_reason is None:
                    restart = Restart.ERROR
            if restart is not None:
                KUBE_WATCH_RESTARTS.labels(resource=name, reason=restart).inc()
                if restart is Restart.EXPIRED:
                    list_reason = "expired"
                    if self._events_since_list == 0:
                        # A version fresh from a LIST cannot be expired already: a server
                        # that says so anyway is met with backoff, not a list/watch spin.
                        delay = self._backoff.next()
                elif restart not in (Restart.CLOSED, Restart.INACTIVE) and delay == 0:
                    # Every other ending is a failure (an exception above has its delay set).
                    delay = self._backoff.next()
                    log.info("kube_watch_restart", resource=name, reason=str(restart))
            if delay > 0:
                await asyncio.sleep(delay)

    # -- list ----------------------------------------------------------------------------
    async def _list(self, reason: str) -> None:
        name = self.resource.name
        KUBE_RELISTS.labels(resource=name, reason=reason).inc()
        self.relists += 1
        started = time.monotonic()
        restarts = 0
        while True:
            listed: set[str] = set()
            continue_token = ""
            try:
                while True:
                    params = {"limit": str(self.tuning.page_size)}
                    if continue_token:
                        params["continue"] = continue_token
                    page = await self.client.request_json("GET", self.resource.path, params=params)
                    version, continue_token = self._apply_page(page, listed)
                    self.last_activity = time.monotonic()
                    if not continue_token:
                        break
                    await asyncio.sleep(0)  # let the data plane run between pages
            except ApiError as exc:
                if exc.status != 410 or not continue_token or restarts >= _MAX_CONTINUE_RESTARTS:
                    raise
                restarts += 1
                KUBE_RELISTS.labels(resource=name, reason="continue_expired").inc()
                log.info("kube_list_continue_expired", resource=name, restarts=restarts)
                continue
            break
        gone = [key for key in self.sink.known_keys() if key not in listed]
        for key in gone:
            self.sink.delete(key, None)  # the deletion no watch event told us about
        self._objects.set(len(self.sink))
        self.resource_version = version
        self._events_since_list = 0
        log.info(
            "kube_listed",
            resource=name,
            reason=reason,
            objects=len(listed),
            synthesised_deletions=len(gone),
            seconds=round(time.monotonic() - started, 3),
        )
        if not self.synced:
            self.synced = True
            KUBE_SYNCED.labels(resource=name).set(1)
            self._synced_event.set()
        if self._on_synced is not None:
            self._on_synced()

    def _apply_page(self, page: object, listed: set[str]) -> tuple[str, str]:
        if not isinstance(page, dict):
            raise ValueError("a LIST answer that is not an object")
        metadata = page.get("metadata") or {}
        version = metadata.get("resourceVersion")
        if not isinstance(version, str) or not version:
            raise ValueError("a LIST answer without metadata.resourceVersion")
        items = page.get("items") or []
        if not isinstance(items, list):
            raise ValueError("a LIST answer whose items are not a list")
        for obj in items:
            if not isinstance(obj, dict):
                continue
            key = self.sink.key(obj)
            if key is None:
                log.warning("kube_object_without_key", resource=self.resource.name)
                continue
            listed.add(key)
            self._deliver("ADDED", key, obj)
        continue_token = metadata.get("continue")
        return version, continue_token if isinstance(continue_token, str) else ""

    # -- watch ---------------------------------------------------------------------------
    async def _watch(self) -> Restart:
        tuning = self.tuning
        timeout = int(tuning.watch_timeout_seconds * (1.0 + self._rng.random()))
        params = {
            "watch": "true",
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(max(timeout, 1)),
        }
        self.watches += 1
        self._watch_events = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        lines = 0
        try:
            async with self.client.watch(
                self.resource.path,
                params,
                inactivity_timeout=tuning.inactivity_timeout,
                max_line_bytes=tuning.max_line_bytes,
            ) as stream:
                async for line in stream:
                    lines += 1
                    self.last_activity = time.monotonic()
                    outcome = self._handle_line(line)
                    if outcome is not None:
                        return outcome
        except WatchInactive:
            log.warning(
                "kube_watch_inactive",
                resource=self.resource.name,
                seconds=tuning.inactivity_timeout,
            )
            return Restart.INACTIVE
        except LineTooLong as exc:
            log.warning("kube_watch_line_too_long", resource=self.resource.name, error=str(exc))
            return Restart.LINE_TOO_LONG
        except (WatchStreamError, aiohttp.ClientPayloadError) as exc:
            log.warning("kube_watch_cut", resource=self.resource.name, error=str(exc))
            return Restart.ERROR
        if lines == 0 and loop.time() - started < tuning.min_watch_seconds:
            return Restart.TOO_SHORT
        return Restart.CLOSED

    def _handle_line(self, line: bytes) -> Restart | None:
        name = self.resource.name
        try:
            event = json.loads(line)
        except ValueError:
            KUBE_EVENTS.labels(resource=name, type="malformed").inc()
            log.warning(
                "kube_watch_malformed_line",
                resource=name,
                excerpt=line[:200].decode("utf-8", "replace"),
            )
            return Restart.MALFORMED
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if kind not in _EVENT_TYPES or not isinstance(obj, dict):
            KUBE_EVENTS.labels(resource=name, type="unknown").inc()
            log.warning("kube_watch_unknown_event", resource=name, type=str(kind)[:64])
            return None
        self._events[kind].inc()
        if kind != "ERROR":
            if self._watch_events == 0:
                self._backoff.reset()  # progress: the next failure starts from the short delay
            self._watch_events += 1
            self._events_since_list += 1
        if kind == "ERROR":
            code, reason = obj.get("code"), obj.get("reason")
            log.info("kube_watch_error_event", resource=name, code=code, reason=reason)
            return Restart.EXPIRED if code == 410 else Restart.API_ERROR
        metadata = obj.get("metadata")
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if kind != "BOOKMARK":
            key = self.sink.key(obj)
            if key is None:
                log.warning("kube_object_without_key", resource=name, type=kind)
            else:
                self._deliver(kind, key, obj)
        if isinstance(version, str) and version:
            self.resource_version = version
        return None

    def _deliver(self, kind: str, key: str, obj: dict[str, Any]) -> None:
        try:
            if kind == "DELETED":
                self.sink.delete(key, obj)
            else:
                self.sink.apply(obj)
            if self.synced:  # during a LIST the count is set once, at its end
                self._objects.set(len(self.sink))
        except Exception:
            # A sink bug must not stop the informer: the object is skipped, the next
            # version of it is tried again.
            log.exception("kube_sink_error", resource=self.resource.name, key=key, type=kind)
