"""The audit record builders as they were before issue 16's rendering work, kept unchanged as
the reference that tests/unit/test_audit_records.py holds proxy.audit to: every record built
field by field into nested dicts, each rendered on its own. Not used by the proxy."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson

from proxy.audit import MAX_RAW_FIELD_CHARS, Exchange
from proxy.core.identity import WorkloadKind
from proxy.errors import Reason


def _cut(value: str | None) -> str | None:
    if value is None or len(value) <= MAX_RAW_FIELD_CHARS:
        return value
    return value[:MAX_RAW_FIELD_CHARS] + "...[truncated]"


_second_cache: tuple[int, str] = (-1, "")


def _timestamp() -> str:
    """RFC 3339 UTC with microseconds, as datetime.isoformat; the seconds part is formatted once
    a second (this runs twice per request)."""
    global _second_cache
    now = time.time()
    second = int(now)
    cached_second, prefix = _second_cache
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_cache = (second, prefix)
    return f"{prefix}.{int((now - second) * 1_000_000):06d}Z"


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
            "pod": {"name": wl.name, "uid": wl.uid or None, "labels": dict(wl.labels)},
            "service_account": wl.service_account or None,
        }
        record["outgate"]["workload"] = (
            f"{wl.owner_kind}/{wl.owner_name}" if wl.owner_kind else None
        )
    if ex.server_name is not None:
        record["tls"] = {"client": {"server_name": _cut(ex.server_name)}}
    if ex.user_name is not None:
        record["user"] = {"name": _cut(ex.user_name)}
    if ex.proxy_protocol is not None:
        record["outgate"]["proxy_protocol"] = {
            "version": ex.proxy_protocol,
            "peer": {"ip": ex.proxy_peer_ip, "port": ex.proxy_peer_port},
        }
    _tls_fields(ex, record["outgate"])
    if ex.method is not None:
        record["http"] = {"request": {"method": _cut(ex.method)}}
    if ex.path is not None:
        record["url"] = {"path": _cut(ex.path)}
    return record


def _tls_fields(ex: Exchange, out: dict[str, Any]) -> None:
    """Tunnel checks, interception, DLP and upgrades (outgate.tls.*, outgate.protocol.*,
    outgate.dlp.*, outgate.upgrade)."""
    if ex.ech is not None or ex.alpn is not None:
        tls: dict[str, Any] = {}
        if ex.ech is not None:
            tls["ech"] = ex.ech
        if ex.alpn is not None:
            tls["alpn"] = [_cut(name) for name in ex.alpn]
        out["tls"] = tls
    if ex.first_bytes_hex is not None:
        out["protocol"] = {"first_bytes": ex.first_bytes_hex}
    if ex.dlp_detector is not None:
        out["dlp"] = {"detector": ex.dlp_detector, "field": _cut(ex.dlp_field)}
    if ex.tunnel_id is not None:
        out["tunnel_id"] = ex.tunnel_id
    if ex.upstream is not None:
        upstream: dict[str, Any] = {"name": ex.upstream}
        if ex.upstream_proxy is not None:
            upstream["proxy"] = ex.upstream_proxy
        if ex.upstream_resolve is not None:
            upstream["resolve"] = ex.upstream_resolve
        if ex.upstream_status is not None:
            upstream["status"] = ex.upstream_status
        out["upstream"] = upstream
    if ex.upgrade is not None:
        out["upgrade"] = _cut(ex.upgrade)


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
    """One line: CR, LF and every control or non-ASCII character escaped (as json's ensure_ascii).

    orjson renders in about a tenth of json's time and escapes control characters the same way;
    it leaves non-ASCII and DEL raw, so a line holding either (rare: raw client strings) is
    rendered again by json with ensure_ascii, and every line stays plain ASCII.
    """
    line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    if line.isascii() and b"\x7f" not in line:
        return line
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"
