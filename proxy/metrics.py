"""Every Prometheus metric the proxy exports, in one place, on one registry.

Label values are bounded sets (reason codes, address classes, namespaces of known workloads),
never raw client input, so a hostile client cannot blow up the series count.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

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
ACTIVE_CONNECTIONS = Gauge(
    "outgate_active_connections",
    "Open connections: client (accepted sockets), tunnel (CONNECT relays), forward (upstreams).",
    ["kind"],
    registry=REGISTRY,
)
CONNECTIONS_ACCEPTED = Counter(
    "outgate_connections_accepted_total",
    "Client connections accepted on the proxy listener.",
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
    "DNS lookups by result (ok, cached, nxdomain, servfail, no_answer, timeout).",
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
GUARD_REFUSALS = Counter(
    "outgate_guard_refusals_total",
    "Addresses the address guard refused, by address class.",
    ["address_class"],
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
AUDIT_BACKPRESSURE = Counter(
    "outgate_audit_backpressure_seconds_total",
    "Seconds the listener spent paused because the audit output was not keeping up.",
    registry=REGISTRY,
)
