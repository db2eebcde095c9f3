"""Every Prometheus metric the proxy exports, in one place, on one registry.

Label values are bounded sets (reason codes, address classes, namespaces of known workloads),
never raw client input, so a hostile client cannot blow up the series count.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, multiprocess

_M = TypeVar("_M", bound="_RememberedChildren")


class _RememberedChildren:
    """`labels()` that remembers its children. prometheus_client checks and sorts the label names
    on every call (several microseconds), and the data plane labels a few metrics per request;
    a child, once made, is the same object until removed, so a dict lookup is enough."""

    _remembered: dict[tuple[tuple[Any, ...], tuple[tuple[str, Any], ...]], Any] | None = None

    def labels(self: _M, *labelvalues: Any, **labelkwargs: Any) -> _M:
        key = (labelvalues, tuple(labelkwargs.items()))
        remembered = self._remembered
        if remembered is None:
            remembered = self._remembered = {}
        child = remembered.get(key)
        if child is None:
            child = super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc]
            remembered[key] = child
        return child  # type: ignore[no-any-return]

    def remove(self, *labelvalues: Any) -> None:
        self._remembered = None
        super().remove(*labelvalues)  # type: ignore[misc]

    def remove_by_labels(self, labels: dict[str, str]) -> None:
        self._remembered = None
        super().remove_by_labels(labels)  # type: ignore[misc]

    def clear(self) -> None:
        self._remembered = None
        super().clear()  # type: ignore[misc]


# Deferred updates (`_Deferred`), except in multiprocess mode: there other processes read the
# values from their files at any moment, so every update is written through at once.
_DEFER = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
_LOOP_THREAD = threading.main_thread().ident
# Gauges backed by a function, in multiprocess mode (`Gauge.set_function`).
_FUNCTION_GAUGES: dict[Any, Callable[[], float]] = {}


class _Deferred:
    """inc() and dec() on the event loop's thread only add to a plain float; prometheus-client's
    own value (a lock and a label check per call) is brought up to date before anything reads
    the samples: every collection goes through `_child_samples`. Updates from other threads
    (the audit writer) are written through, so no update is lost to a race."""

    _pending: float = 0.0
    _value: Any

    def _defer(self, amount: float) -> bool:
        if not _DEFER or threading.get_ident() != _LOOP_THREAD:
            return False
        if not self._is_observable():  # type: ignore[attr-defined]
            return False  # a labelled parent: the normal path raises its error
        self._pending += amount
        return True

    def _apply(self) -> None:
        pending = self._pending
        if pending and threading.get_ident() == _LOOP_THREAD:
            self._pending = 0.0
            self._value.inc(pending)

    def _child_samples(self) -> Any:
        self._apply()
        return super()._child_samples()  # type: ignore[misc]


class Counter(_Deferred, _RememberedChildren, prometheus_client.Counter):
    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if exemplar is None and amount >= 0 and self._defer(amount):
            return
        super().inc(amount, exemplar)

    def reset(self) -> None:
        self._pending = 0.0
        super().reset()


class Gauge(_Deferred, _RememberedChildren, prometheus_client.Gauge):
    """With `workers: N` (multiprocess mode) a gauge merges the live workers' values by
    `multiprocess_mode`: most gauges here hold what every worker holds alike (policy revision,
    informer state), so the default is their maximum; counts of things each worker owns say
    `livesum`, health flags `livemin`. Outside multiprocess mode the mode is ignored."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        multiprocess_mode: Any = "livemax",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            name, documentation, labelnames, multiprocess_mode=multiprocess_mode, **kwargs
        )

    def inc(self, amount: float = 1) -> None:
        if not self._is_most_recent and self._defer(amount):
            return
        super().inc(amount)

    def dec(self, amount: float = 1) -> None:
        if not self._is_most_recent and self._defer(-amount):
            return
        super().dec(amount)

    def set(self, value: float) -> None:
        self._pending = 0.0  # what is set replaces what was added
        super().set(value)

    def set_function(self, f: Callable[[], float]) -> None:
        super().set_function(f)
        if not _DEFER:
            # Multiprocess mode merges what the files hold, and a function gauge writes none:
            # `exposition` stores this worker's current value before every merge.
            _FUNCTION_GAUGES[self] = f


class Histogram(_RememberedChildren, prometheus_client.Histogram):
    pass


REGISTRY = CollectorRegistry(auto_describe=True)


def exposition() -> bytes:
    """What /metrics serves: this process's metrics, or with `workers` above 1 (multiprocess
    mode, proxy.supervisor) the samples of every worker, merged."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return prometheus_client.generate_latest(REGISTRY)
    for gauge, function in list(_FUNCTION_GAUGES.items()):
        prometheus_client.Gauge.set(gauge, function())
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
    return prometheus_client.generate_latest(merged)


DECISIONS = Counter(
    "outgate_decisions_total",
    "Decisions made, by outcome, reason code and source namespace ('' for unknown sources).",
    ["action", "reason", "namespace"],
    registry=REGISTRY,
)
SHADOW_DIFFERENCES = Counter(
    "outgate_shadow_decision_differences_total",
    "Decisions where audit-mode policies would have decided otherwise, by shadow action.",
    ["shadow_action", "namespace"],
    registry=REGISTRY,
)
# Issue 15: per destination, for cluster-wide views. `workload` is the source's owner
# (`Deployment/api`, `Static/laptop`, `unknown`, `other` past traffic.maxWorkloads) and
# `destination` is `host:port` for a workload's first traffic.metricDestinations destinations,
# `other` for the rest (proxy.traffic): at most workloads x (metricDestinations + 1) series.
DESTINATION_REQUESTS = Counter(
    "outgate_destination_requests_total",
    "Decisions by source namespace, workload and destination (host:port for each workload's "
    "first traffic.metricDestinations destinations, 'other' for the rest), by action.",
    ["namespace", "workload", "destination", "action"],
    registry=REGISTRY,
)
DESTINATION_BYTES = Counter(
    "outgate_destination_bytes_total",
    "Bytes relayed by source namespace, workload and destination (labels as "
    "outgate_destination_requests_total): 'egress' = client to upstream, 'ingress' = upstream "
    "to client.",
    ["namespace", "workload", "destination", "direction"],
    registry=REGISTRY,
)
ACTIVE_CONNECTIONS = Gauge(
    "outgate_active_connections",
    "Open connections: client (accepted sockets), tunnel (CONNECT relays), forward (upstreams), "
    "upgrade (connections relayed after a 101), transparent-tls, transparent-http, port-map "
    "(accepted on a transparent listener).",
    ["kind"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
CONNECTIONS_ACCEPTED = Counter(
    "outgate_connections_accepted_total",
    "Client connections accepted on the proxy listener and the transparent listeners.",
    registry=REGISTRY,
)
TRANSPARENT_CONNECTIONS = Counter(
    "outgate_transparent_connections_total",
    "Client connections accepted on a transparent listener (issue 13), by listener kind: "
    "transparent-tls, transparent-http, port-map. Also counted in "
    "outgate_connections_accepted_total.",
    ["listener"],
    registry=REGISTRY,
)
BYTES = Counter(
    "outgate_bytes_total",
    "Bytes relayed: 'egress' = client to upstream, 'ingress' = upstream to client.",
    ["direction"],
    registry=REGISTRY,
)
DNS_LOOKUPS = Counter(
    "outgate_dns_lookups_total",
    "DNS lookups by result (ok, cached, hosts, nxdomain, servfail, no_answer, timeout).",
    ["result"],
    registry=REGISTRY,
)
DNS_LATENCY = Histogram(
    "outgate_dns_lookup_seconds",
    "Latency of DNS lookups that went to a nameserver (cache hits excluded).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
UPSTREAM_CONNECT_ERRORS = Counter(
    "outgate_upstream_connect_errors_total",
    "Upstream connects that failed, by kind (refused, timeout, reset, unreachable).",
    ["kind"],
    registry=REGISTRY,
)
# Parent proxies (issue 12). `upstream` is a configured name and `proxy` a configured host:port,
# so both are bounded by the config.
UPSTREAM_REQUESTS = Counter(
    "outgate_upstream_requests_total",
    "Requests (kind forward) and tunnels (kind tunnel) routed via an upstream, by result: ok, "
    "refused (the parent answered CONNECT with non-2xx), unavailable (no proxy could be "
    "connected), timeout.",
    ["upstream", "kind", "result"],
    registry=REGISTRY,
)
UPSTREAM_CONNECT_SECONDS = Histogram(
    "outgate_upstream_connect_seconds",
    "Time to connect to a parent proxy (TCP, and TLS for https:// parents).",
    ["upstream"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
UPSTREAM_PROXY_FAILURES = Counter(
    "outgate_upstream_proxy_connect_failures_total",
    "Connect failures per parent proxy (refused, unreachable, timed out, TLS failed).",
    ["upstream", "proxy"],
    registry=REGISTRY,
)
UPSTREAM_PROXY_UP = Gauge(
    "outgate_upstream_proxy_up",
    "1 while a parent proxy is in use, 0 while it is marked down after failLimit connect "
    "failures (it turns 1 again on its next successful connect, tried after retryAfter).",
    ["upstream", "proxy"],
    registry=REGISTRY,
)
GUARD_REFUSALS = Counter(
    "outgate_guard_refusals_total",
    "Addresses the address guard refused, by address class.",
    ["address_class"],
    registry=REGISTRY,
)
EVENT_LOOP_LAG = Gauge(
    "outgate_event_loop_lag_seconds",
    "How late the event loop ran its last periodic tick: past limits.shedLoopLag new "
    "connections are shed (503 overloaded). With workers, the largest of the workers.",
    registry=REGISTRY,
)
ACCEPT_QUEUE_FILL = Gauge(
    "outgate_accept_queue_fill_ratio",
    "How full the fullest listener's kernel accept queue was at the last periodic tick (0 to "
    "1): from limits.shedAcceptQueue new connections are shed (503 overloaded). With workers, "
    "the largest of the workers.",
    registry=REGISTRY,
)
SHED_CONNECTIONS = Counter(
    "outgate_shed_connections_total",
    "New connections refused with 503 overloaded because the process ran behind, by the "
    "signal that said so: loop_lag or accept_queue.",
    ["signal"],
    registry=REGISTRY,
)
for _signal in ("loop_lag", "accept_queue"):
    SHED_CONNECTIONS.labels(signal=_signal)  # both series from the start, at 0

BUILD_INFO = Gauge(
    "outgate_build_info",
    "1, labelled with the build that runs: compiled (the hot modules compiled with mypyc) or "
    "pure-python (docs/performance.md; the start-up `build` log line says why).",
    ["build"],
    registry=REGISTRY,
)

POLICY_REVISION = Gauge(
    "outgate_policy_revision",
    "Revision number of the policy set in force (increments on every successful load).",
    registry=REGISTRY,
)
POLICY_RELOADS = Counter(
    "outgate_policy_reloads_total",
    "Policy (re)loads by result (success, failure).",
    ["result"],
    registry=REGISTRY,
)
POLICY_LAST_RELOAD_OK = Gauge(
    "outgate_policy_last_reload_success",
    "1 if the last policy load succeeded, 0 if it failed and an older policy is in force.",
    multiprocess_mode="livemin",
    registry=REGISTRY,
)
POLICY_RULES = Gauge(
    "outgate_policy_rules",
    "Rules in the policy set in force.",
    registry=REGISTRY,
)
AUDIT_RECORDS = Counter(
    "outgate_audit_records_total",
    "Audit records written, by event action (decision, close).",
    ["action"],
    registry=REGISTRY,
)
WORKER_RESTARTS = Counter(
    "outgate_worker_restarts_total",
    "Workers the supervisor started again after one exited (`workers` above 1).",
    registry=REGISTRY,
)
AUDIT_BACKPRESSURE = Counter(
    "outgate_audit_backpressure_seconds_total",
    "Seconds the listener spent paused because the audit output was not keeping up.",
    registry=REGISTRY,
)

# -- Kubernetes informers (issue 3). `resource` is one of the few resources Outgate watches
# (pods, namespaces, jobs, clusteregresspolicies, egresspolicies): a bounded label.
KUBE_RELISTS = Counter(
    "outgate_kube_relists_total",
    "Full LISTs by resource and reason (initial, expired = watch history compacted (410), "
    "continue_expired = a paged list's continue token expired and the list restarted).",
    ["resource", "reason"],
    registry=REGISTRY,
)
KUBE_WATCH_RESTARTS = Counter(
    "outgate_kube_watch_restarts_total",
    "Watches that ended, by resource and reason (closed, expired, inactive, too_short, error, "
    "malformed, line_too_long, api_error).",
    ["resource", "reason"],
    registry=REGISTRY,
)
KUBE_EVENTS = Counter(
    "outgate_kube_watch_events_total",
    "Watch events received, by resource and type (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR, "
    "unknown, malformed).",
    ["resource", "type"],
    registry=REGISTRY,
)
KUBE_SECONDS_SINCE_EVENT = Gauge(
    "outgate_kube_seconds_since_last_event",
    "Seconds since the last list, watch event or bookmark of a resource; refreshed every "
    "second. Grows on a resource nobody writes to (a 1.20 API server sends no bookmark there): "
    "informational, not a fault; outgate_kube_seconds_since_last_sync is the health signal.",
    ["resource"],
    registry=REGISTRY,
)
KUBE_SECONDS_SINCE_SYNC = Gauge(
    "outgate_kube_seconds_since_last_sync",
    "Seconds since the informer of a resource was last in sync: 0 while its watch is open and "
    "healthy (open a second, or delivered an event), growing while the watch or the list "
    "fails (since the start, before the first sync); refreshed every second.",
    ["resource"],
    registry=REGISTRY,
)
KUBE_WATCH_ESTABLISHED = Gauge(
    "outgate_kube_watch_established",
    "1 while a watch of the resource is open (the API server answered it), else 0 (listing, "
    "backing off, or reconnecting).",
    ["resource"],
    multiprocess_mode="livemin",
    registry=REGISTRY,
)
KUBE_OBJECTS = Gauge(
    "outgate_kube_objects",
    "Objects held per resource (pods: pods in the IP index).",
    ["resource"],
    registry=REGISTRY,
)
KUBE_SYNCED = Gauge(
    "outgate_kube_synced",
    "1 once the first full LIST of a resource has been applied, else 0.",
    ["resource"],
    multiprocess_mode="livemin",
    registry=REGISTRY,
)
KUBE_API_ERRORS = Counter(
    "outgate_kube_api_errors_total",
    "Kubernetes API requests that failed, by resource and HTTP status ('connection' when none).",
    ["resource", "status"],
    registry=REGISTRY,
)
KUBE_TOKEN_REREADS = Counter(
    "outgate_kube_token_rereads_total",
    "Service-account token re-reads forced by a 401 answer.",
    registry=REGISTRY,
)
POD_IP_CONFLICTS = Counter(
    "outgate_pod_ip_conflicts_total",
    "Pod IP conflicts: 'ambiguous' = two live pods claim one IP (connections refused), "
    "'superseded' = a live pod took over the IP of a terminating one.",
    ["kind"],
    registry=REGISTRY,
)
POD_AMBIGUOUS_IPS = Gauge(
    "outgate_pod_ambiguous_ips",
    "IPs currently claimed by two or more live pods; refreshed every second.",
    registry=REGISTRY,
)
POD_SOURCE_GONE_CLOSES = Counter(
    "outgate_pod_source_gone_connections_closed_total",
    "Connections closed because their source pod left the index (its IP may be reused).",
    registry=REGISTRY,
)
IDENTITY_LOOKUPS = Counter(
    "outgate_identity_lookups_total",
    "Source lookups in the pod index by result (hit, miss, ambiguous, not_synced).",
    ["result"],
    registry=REGISTRY,
)
KUBE_INVALID_POLICIES = Gauge(
    "outgate_kube_invalid_policies",
    "Policy objects from the cluster that are invalid, by kind (each fails closed: it denies its "
    "subjects everything at its place until it is fixed).",
    ["kind"],
    registry=REGISTRY,
)
KUBE_EVENTS_POSTED = Counter(
    "outgate_kube_events_posted_total",
    "Kubernetes Events Outgate posted about invalid policies, by result (created, exists, "
    "failed, dropped).",
    ["result"],
    registry=REGISTRY,
)
POLICY_STATUS_LEADER = Gauge(
    "outgate_policy_status_leader",
    "1 while this proxy holds the policy-status Lease and so writes .status of policy objects, "
    "else 0 (the sum over all replicas is 1 when status is being written).",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
POLICY_STATUS_WRITES = Counter(
    "outgate_policy_status_writes_total",
    "Status patches of policy objects by result (written, conflict = the object changed since "
    "it was read, gone = deleted, failed).",
    ["result"],
    registry=REGISTRY,
)

# -- TLS: tunnel checks, interception, DLP (issue 4) ---------------------------------------------
TUNNEL_SPLICES = Counter(
    "outgate_tunnel_splices_total",
    "Opaque tunnels that passed limits.spliceAfterBytes, by what happened: spliced (relayed by "
    "the kernel from then on), or why they stayed on the Protocol relay: budget "
    "(limits.spliceMaxTunnels reached), descriptors (no pipe or duplicate: EMFILE, ENFILE), "
    "unsupported (splice refused a descriptor), closed (a side left, or read nothing for the "
    "idle timeout, while switching).",
    ["outcome"],
    registry=REGISTRY,
)
SPLICED_TUNNELS = Gauge(
    "outgate_spliced_tunnels",
    "Tunnels relayed by splice(2) now; each holds 4 descriptors more than on the Protocol relay "
    "(two pipes).",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
TUNNEL_VIOLATIONS = Counter(
    "outgate_tunnel_violations_total",
    "Tunnels closed because their first bytes broke the rule: SNI, ECH, ClientHello and "
    "protocol checks, by reason code.",
    ["reason"],
    registry=REGISTRY,
)
CERTS_MINTED = Counter(
    "outgate_certificates_minted_total",
    "Interception leaf certificates signed by the cluster CA.",
    registry=REGISTRY,
)
CERT_CACHE_HITS = Counter(
    "outgate_certificate_cache_hits_total",
    "Interceptions served a leaf certificate from the cache (or from a mint already under way).",
    registry=REGISTRY,
)
CERT_CACHE_ENTRIES = Gauge(
    "outgate_certificate_cache_entries",
    "Leaf certificates held in the bounded cache.",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
INTERCEPT_HANDSHAKE_FAILURES = Counter(
    "outgate_intercept_handshake_failures_total",
    "Interception TLS handshakes that failed, by side (client: the workload refused or broke "
    "the minted certificate's handshake; upstream: the origin's certificate or handshake).",
    ["side"],
    registry=REGISTRY,
)
DLP_HITS = Counter(
    "outgate_dlp_hits_total",
    "Intercepted requests refused by a DLP detector, by detector (built-in or dlp.custom name).",
    ["detector"],
    registry=REGISTRY,
)

# `outgate webhook` (its own process: these are the only metrics it exports).
WEBHOOK_REVIEWS = Counter(
    "outgate_webhook_reviews_total",
    "AdmissionReviews answered, by webhook (validate-policies, mutate-pods) and result (allowed, "
    "denied, patched, error).",
    ["webhook", "result"],
    registry=REGISTRY,
)
WEBHOOK_BAD_REQUESTS = Counter(
    "outgate_webhook_bad_requests_total",
    "Requests to the webhook answered with an error status instead of a review (400 malformed, "
    "408 too slow, 413 too large, ...), by status.",
    ["status"],
    registry=REGISTRY,
)
WEBHOOK_CERTIFICATE_RELOADS = Counter(
    "outgate_webhook_certificate_reloads_total",
    "Re-reads of the webhook's serving certificate after its files changed, by result "
    "(success, failure: the previous certificate keeps serving).",
    ["result"],
    registry=REGISTRY,
)
