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
     resourceVersion; ERROR with code 410 (history compacted) -> back to step 1; another
     ERROR -> backoff, watch again. An unknown type is counted and skipped
     (forward-compatible); a line that is not JSON ends the watch (the stream is suspect).
  4. A clean close (the server's timeout) -> watch again from the last resourceVersion seen,
     at once. A watch that closed within a second having delivered nothing is not "clean"
     but a failure (client-go's "very short watch"), so a server closing every watch at once
     is met with backoff, not a request spin.
  5. No line for `inactivity_timeout` (not even a bookmark) -> reconnect from the last version.
     Silence is normal: a 1.20 API server sent no bookmark on a resource without writes for 16
     minutes. The reconnect only replaces a connection a NAT or load balancer may have dropped
     silently; it is not a fault, and it is logged at debug level.
  6. Errors (connection, 5xx, 403) back off exponentially with jitter; a 429 waits at least
     its Retry-After; an HTTP 410 on the watch request relists.

Recovery (issue 18, D1). A watch that stayed open `min_watch_seconds`, or delivered an event,
is *progress*: it ends the failure streak, so the next failure starts again from the shortest
delay (client-go's backoff manager resets after a quiet period too; `Backoff` does both, and
bounds each delay by the length of the outage so far). After an API-server restart every older
version is expired, so a 410 relists at once, whether or not an event came since the last
LIST: "a version fresh from a LIST cannot be expired" is false across a restart. One case
waits for the backoff: a 410 answering the first watch after a LIST that was itself made for
a 410. That is a server that lists fine and expires every version it hands out; it sees one
LIST per backoff step, not a storm. A server that refuses every watch is never relisted.
Only a 429's Retry-After is a floor on the delay: a restarting server's 503 "starting" says
10 s, which would leave a new policy unenforced long after the server is ready.

Staleness (issue 18, D3). The informer is *in sync* while a watch is open and healthy (as
above); `outgate_kube_seconds_since_last_sync` counts from the last moment it was. It grows
only while the watch or the list is failing, never on silence.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Iterable
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
    KUBE_SECONDS_SINCE_SYNC,
    KUBE_SYNCED,
    KUBE_WATCH_ESTABLISHED,
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
    # A watch with no line (not even a bookmark) for this long is replaced, in case a NAT or
    # load balancer dropped the connection silently. Newer API servers send a bookmark about
    # once a minute; a 1.20 server sends none on a resource without writes, so on such a
    # resource this is simply how often the idle watch is renewed (`timeouts.kubeWatchInactivity`).
    inactivity_timeout: float = 150.0
    # client-go: a watch that ends within a second with no event is an error ("very short").
    # A watch open this long (or that delivered an event) is progress: see the module docstring.
    min_watch_seconds: float = 1.0
    # client-go's reflector backoff: 800 ms doubling to 30 s, with jitter...
    backoff_initial: float = 0.8
    backoff_max: float = 30.0
    # ...started over after this long without a failure (client-go's backoff manager: 2 min)...
    backoff_reset_after: float = 120.0
    # ...and never longer than this share of the failure streak so far, so that recovery lags
    # the server's return by at most a quarter of the outage: an API server restarting in 5 s
    # is listed again within about 1.3 s of its readiness (issue 18's target: 2 s), and an
    # outage of hours still settles at 30 s between attempts.
    backoff_outage_fraction: float = 0.25
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
    from `initial` up to `maximum`. A Retry-After is honoured as a floor.

    The delays of one failure *streak* climb; a streak ends with `reset()` (progress), or when
    `reset_after` passes after the last delay ended with no new failure (client-go's backoff
    manager). Within a streak, d is also at most `outage_fraction` of the streak's length so
    far (and at least `initial`), which bounds how late the first attempt after the server's
    return can come."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        reset_after: float = math.inf,
        outage_fraction: float = math.inf,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.reset_after = reset_after
        self.outage_fraction = outage_fraction
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._clock = clock
        self._current = initial
        self._streak_start: float | None = None
        self._quiet_since = 0.0

    def next(self, retry_after: float | None = None) -> float:
        now = self._clock()
        if self._streak_start is None or now - self._quiet_since > self.reset_after:
            self._streak_start = now
            self._current = self.initial
        ceiling = min(self._current, self.maximum)
        if not math.isinf(self.outage_fraction):
            outage = now - self._streak_start
            ceiling = min(ceiling, max(self.initial, outage * self.outage_fraction))
        self._current = min(self._current * 2, self.maximum)
        delay = ceiling / 2 + self._rng.random() * ceiling / 2
        delay = max(delay, retry_after or 0.0)
        self._quiet_since = now + delay
        return delay

    def reset(self) -> None:
        self._current = self.initial
        self._streak_start = None


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
        self._backoff = Backoff(
            tuning.backoff_initial,
            tuning.backoff_max,
            reset_after=tuning.backoff_reset_after,
            outage_fraction=tuning.backoff_outage_fraction,
            rng=self._rng,
        )
        self.resource_version = ""
        self.synced = False
        self._synced_event = asyncio.Event()
        now = time.monotonic()
        self.last_activity = now
        self.relists = 0
        self.watches = 0
        self._watch_events = 0
        # The open watch: when its answer came (None: no watch open), and the last moment the
        # informer was known in sync (a healthy watch open, or one that ended healthy).
        self._watch_opened: float | None = None
        self._in_sync_at = now
        # Watches made from the last LIST's version, and why that LIST was made: a 410 to
        # the first watch after a LIST that was itself made for a 410 waits for the backoff.
        self._watches_since_list = 0
        self._last_list_reason = ""
        label = resource.name
        self._events = {
            kind: KUBE_EVENTS.labels(resource=label, type=kind) for kind in _EVENT_TYPES
        }
        self._objects = KUBE_OBJECTS.labels(resource=label)
        self._age = KUBE_SECONDS_SINCE_EVENT.labels(resource=label)
        self._sync_age = KUBE_SECONDS_SINCE_SYNC.labels(resource=label)
        self._established = KUBE_WATCH_ESTABLISHED.labels(resource=label)
        self._established.set(0)
        KUBE_SYNCED.labels(resource=label).set(0)

    def publish_age(self) -> None:
        """Set the age gauges (a ticker calls this: values are written, not computed at scrape
        time, so `workers` processes can share them)."""
        now = time.monotonic()
        if self._watch_healthy(now):
            self._in_sync_at = now
        self._age.set(now - self.last_activity)
        self._sync_age.set(now - self._in_sync_at)

    @property
    def seconds_since_sync(self) -> float:
        """What `outgate_kube_seconds_since_last_sync` shows, computed now."""
        now = time.monotonic()
        return 0.0 if self._watch_healthy(now) else now - self._in_sync_at

    def _watch_healthy(self, now: float) -> bool:
        """A watch is open and is progress: it delivered an event (not an ERROR), or it has
        stayed open `min_watch_seconds` (the "very short watch" bound of client-go)."""
        opened = self._watch_opened
        return opened is not None and (
            self._watch_events > 0 or now - opened >= self.tuning.min_watch_seconds
        )

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
                    # Only a 429 (the API server's flow control) sets a floor: the 503 "server
                    # is starting" of a restarting API server says Retry-After 10, and waiting
                    # that long would leave a new policy unenforced long after it is ready.
                    retry_after = exc.retry_after if exc.status == 429 else None
                    delay = self._backoff.next(retry_after)
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
                    if self._watches_since_list == 1 and self._last_list_reason == "expired":
                        # The version a relist just handed out expired at once, again: the
                        # server expires every version. Relist at the backoff's pace.
                        delay = self._backoff.next()
                        log.info(
                            "kube_watch_expired_again", resource=name, retry_in=round(delay, 3)
                        )
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
        self._watches_since_list = 0
        self._last_list_reason = reason
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
        self._watches_since_list += 1
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
                self._watch_opened = time.monotonic()
                self._established.set(1)
                async for line in stream:
                    lines += 1
                    self.last_activity = time.monotonic()
                    outcome = self._handle_line(line)
                    if outcome is not None:
                        return outcome
        except WatchInactive:
            # Silence, not a fault (see the module docstring): the watch is renewed.
            log.debug(
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
        finally:
            self._watch_ended()
        if lines == 0 and loop.time() - started < tuning.min_watch_seconds:
            return Restart.TOO_SHORT
        return Restart.CLOSED

    def _watch_ended(self) -> None:
        """A watch ended (or was never answered). If it was progress, the failure streak ends
        and the informer was in sync up to now."""
        now = time.monotonic()
        if self._watch_healthy(now):
            self._in_sync_at = now
            self._backoff.reset()
        self._watch_opened = None
        self._established.set(0)

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
            self._watch_events += 1  # progress (see `_watch_healthy`)
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
