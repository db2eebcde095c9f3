"""The audit record schema and the sink that writes it: one JSON line per decision and per close.

Field names follow the Elastic Common Schema (nested objects), so Fluent Bit, Vector or a SIEM
ingest the lines as they are. Records are rendered here with `json` rather than through
structlog because ECS's `event` object collides with structlog's reserved `event` key;
structlog renders the proxy's operational logs (stderr).

A record is never dropped. The event loop hands rendered lines to a writer thread that blocks on
stdout as long as it must; when more than `HIGH_WATER_BYTES` wait, `congested` turns true and the
listener stops serving new connections until the backlog falls under `LOW_WATER_BYTES`.

`audit.format` chooses the lines (issue 8): `json` (the default) the records above, `squid` one
Squid access.log line per close instead, `both` the two, Squid's to `audit.squidOutput` (a file,
so JSON and Squid lines never interleave on one stream). Every line, of either kind, goes through
the same queue and writer thread, so the backpressure and the never-drop rule cover both.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any

import orjson
import structlog

from proxy import metrics
from proxy.adoption.squid_log import LogFormat, parse_logformat, squid_line
from proxy.config import Settings
from proxy.core.identity import Workload, WorkloadKind
from proxy.core.policy.engine import Decision, Outcome
from proxy.errors import ConfigError, ConfigIssue, Reason
from proxy.fdio import write_all

log = structlog.get_logger(__name__)

# Raw client strings (paths, methods) are cut here: a record must stay one bounded line.
MAX_RAW_FIELD_CHARS = 1024
# 1 MiB of pending lines: a few thousand records, far more than a healthy collector lags.
HIGH_WATER_BYTES = 1 << 20
LOW_WATER_BYTES = 256 << 10
# Records from the event loop wake the writer thread at most once per this many seconds: each
# wake is a thread switch and a GIL hand-over, which costs more than rendering a record, and at
# a few thousand records a second batching them is what keeps the sink cheap. A line reaches
# stdout this much later at most; shutdown and congestion flush at once.
WRITER_WAKE_DELAY = 0.005


# Event ids are cut from one getrandom(2) call per this many ids: the same CSPRNG bytes as
# secrets.token_hex(16), without a syscall (and a GIL release) on every request.
_IDS_PER_DRAW = 256
_id_pool: list[str] = []


def _draw_ids() -> list[str]:
    pool = os.urandom(16 * _IDS_PER_DRAW).hex()
    return [pool[i : i + 32] for i in range(0, len(pool), 32)]


def _forget_ids() -> None:
    _id_pool.clear()  # a forked child must never hand out its parent's ids


os.register_at_fork(after_in_child=_forget_ids)


def new_event_id() -> str:
    """128 random bits: unique across replicas and restarts without coordination."""
    try:
        return _id_pool.pop()
    except IndexError:
        _id_pool.extend(_draw_ids())
        return _id_pool.pop()


def _cut(value: str | None) -> str | None:
    return None if value is None else _cut_text(value)


def _cut_text(value: str) -> str:
    if len(value) <= MAX_RAW_FIELD_CHARS:
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
    server_name: str | None = None  # the ClientHello's SNI, as sent (ECS tls.client.server_name)
    ech: bool | None = None  # the ClientHello offered ECH (or the old ESNI): outer SNI only
    alpn: tuple[str, ...] | None = None  # ALPN protocols the ClientHello offered
    first_bytes_hex: str | None = None  # a refused tunnel's first bytes (FIRST_BYTES_AUDITED)
    dlp_detector: str | None = None  # the DLP detector that refused the request
    dlp_field: str | None = None  # where it fired (a header's name, url.query...), never the value
    tunnel_id: str | None = None  # a request inside a tunnel: the tunnel's event id
    # Issue 12, with upstreams configured: "direct" or the upstream's name, the parent proxy used
    # (host:port), who resolved the name ("local" | "parent"), and a parent's refusing status.
    upstream: str | None = None
    upstream_proxy: str | None = None
    upstream_resolve: str | None = None
    upstream_status: int | None = None
    upgrade: str | None = None  # the protocol a 101 switched to (lowercased), e.g. "websocket"
    # Issue 14: the load balancer whose PROXY header named the source, and the header's version.
    proxy_peer_ip: str | None = None
    proxy_peer_port: int | None = None
    proxy_protocol: int | None = None
    user_name: str | None = None  # the proxy-auth user the workload came from (ECS user.name)
    # Issue 15: what a refused client sent, for the admin page's recent refusals only (not
    # written to the record): the request target as sent, the Host field and the User-Agent.
    raw_target: str | None = None
    host_field: str | None = None
    user_agent: str | None = None
    traffic_row: object = None  # the row of proxy.traffic's aggregate it was counted in
    decision: Decision | None = None
    reason: Reason | None = None
    status: int | None = None
    source_bytes: int = 0  # bytes the client sent (ECS source.bytes)
    destination_bytes: int = 0  # bytes the upstream sent (ECS destination.bytes)
    decided: bool = False
    closed: bool = False
    # proxy.audit's: the parts of a request's records rendered once for both, with what they
    # show (about 1 KiB, kept from the decision to the close).
    audit_parts: tuple[Any, ...] | None = None


# The current second as floats [start, end) and its text up to the decimal point: formatted
# once a second (a timestamp is taken twice per request).
_second: tuple[float, float, str] = (0.0, 0.0, "")
# Zeros that pad the microseconds to six digits, by the count of their digits.
_PAD = ("000000", "00000", "0000", "000", "00", "0", "", "")


def _timestamp() -> str:
    """RFC 3339 UTC with microseconds, as datetime.isoformat."""
    global _second
    now = time.time()
    start, end, prefix = _second
    if not start <= now < end:
        second = int(now)
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _second = start, end, prefix = (float(second), float(second + 1), prefix)
    micro = str(int((now - start) * 1_000_000))
    return f"{prefix}{_PAD[len(micro)]}{micro}Z"


# Records are written as text built field by field, not as nested dicts handed to a JSON
# encoder: a record is some 15 small objects and an encoder pass otherwise, twice per request.
# The line is the one `json.dumps(record, ensure_ascii=True, separators=(",", ":"))` gives, key
# for key in the same order (tests/unit/test_audit_records.py holds it to the builders before
# this, byte for byte): every string not written here is escaped by json's own ASCII encoder
# (control characters, quotes, backslash, DEL and non-ASCII as \uXXXX), so a line is one line
# of plain ASCII whatever a client sent.
_json_str = encode_basestring_ascii
_REASONS = {reason: _json_str(str(reason)) for reason in Reason}
_OUTCOMES = {outcome: _json_str(str(outcome)) for outcome in Outcome}


def _json_opt(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


def _json_raw(value: str | None) -> str:
    """A raw client string, cut (`_cut`) and escaped."""
    if value is None:
        return "null"
    return _json_str(value if len(value) <= MAX_RAW_FIELD_CHARS else _cut_text(value))


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(int(value))


# What a record says about its workload depends on the Workload alone, and one workload sends
# many requests: (workload, the `source_kind` and `workload` members of `outgate`, the
# `kubernetes` member), rendered once per Workload object (compared by identity, held so that its
# id cannot be reused while here). Bounded, and emptied when full.
WORKLOAD_PARTS_CACHE_SIZE = 1024
_WorkloadParts = tuple[Workload, str, str]
_workload_parts: dict[int, _WorkloadParts] = {}


def _parts_of(wl: Workload) -> _WorkloadParts:
    found = _workload_parts.get(id(wl))
    if found is not None and found[0] is wl:
        return found
    who = f'"source_kind":{_json_str(str(wl.kind))}'
    kubernetes = ""
    if wl.kind is not WorkloadKind.UNKNOWN:
        pod = {"name": wl.name, "uid": wl.uid or None, "labels": dict(wl.labels)}
        value = {
            "namespace": wl.namespace,
            "pod": pod,
            "service_account": wl.service_account or None,
        }
        kubernetes = ',"kubernetes":' + json.dumps(value, ensure_ascii=True, separators=(",", ":"))
        owner = f"{wl.owner_kind}/{wl.owner_name}" if wl.owner_kind else None
        who += f',"workload":{_json_opt(owner)}'
    if len(_workload_parts) >= WORKLOAD_PARTS_CACHE_SIZE:
        _workload_parts.clear()
    found = (wl, who, kubernetes)
    _workload_parts[id(wl)] = found
    return found


def _outgate_extras(ex: Exchange) -> str:
    """The optional members of `outgate` both actions carry: the PROXY header, tunnel checks,
    interception, DLP, upstreams and upgrades (outgate.proxy_protocol, outgate.tls.*,
    outgate.protocol.*, outgate.dlp.*, outgate.tunnel_id, outgate.upstream.*, outgate.upgrade).
    Empty for most requests."""
    text = ""
    if ex.proxy_protocol is not None:
        text += (
            f',"proxy_protocol":{{"version":{_json_int(ex.proxy_protocol)},"peer":'
            f'{{"ip":{_json_opt(ex.proxy_peer_ip)},"port":{_json_int(ex.proxy_peer_port)}}}}}'
        )
    if ex.ech is not None or ex.alpn is not None:
        tls: list[str] = []
        if ex.ech is not None:
            tls.append('"ech":true' if ex.ech else '"ech":false')
        if ex.alpn is not None:
            tls.append('"alpn":[' + ",".join(_json_raw(name) for name in ex.alpn) + "]")
        text += ',"tls":{' + ",".join(tls) + "}"
    if ex.first_bytes_hex is not None:
        text += f',"protocol":{{"first_bytes":{_json_str(ex.first_bytes_hex)}}}'
    if ex.dlp_detector is not None:
        text += (
            f',"dlp":{{"detector":{_json_str(ex.dlp_detector)},"field":{_json_raw(ex.dlp_field)}}}'
        )
    if ex.tunnel_id is not None:
        text += f',"tunnel_id":{_json_str(ex.tunnel_id)}'
    if ex.upstream is not None:
        upstream = f',"upstream":{{"name":{_json_str(ex.upstream)}'
        if ex.upstream_proxy is not None:
            upstream += f',"proxy":{_json_str(ex.upstream_proxy)}'
        if ex.upstream_resolve is not None:
            upstream += f',"resolve":{_json_str(ex.upstream_resolve)}'
        if ex.upstream_status is not None:
            upstream += f',"status":{_json_int(ex.upstream_status)}'
        text += upstream + "}"
    if ex.upgrade is not None:
        text += f',"upgrade":{_json_raw(ex.upgrade)}'
    return text


# The parts of an exchange's records that both carry, rendered for the first and reused by the
# second while what they show is unchanged (compared by value: the data plane sets some fields
# after the decision, e.g. the address dialled): the event id; `source` and `destination` up to
# the close's `bytes`; `outgate` up to its optional members; the members after `outgate` up to
# the response's status (`kubernetes`, `tls`, `user`, `http.request`), whether `http` is open
# (a method), the members after the status (`url`, `rule`); `outgate.policy_revision`.
_Parts = tuple[tuple[Any, ...], str, str, str, str, str, bool, str, str]


def _parts(ex: Exchange) -> _Parts:
    shown = (
        ex.id,
        ex.kind,
        ex.source_ip,
        ex.source_port,
        ex.workload,
        ex.destination_domain,
        ex.destination_ip,
        ex.destination_port,
        ex.server_name,
        ex.user_name,
        ex.method,
        ex.path,
        ex.decision,
    )
    parts = ex.audit_parts
    if parts is not None and parts[0] == shown:
        return parts
    # Written out rather than through the _json_* helpers: a Python call costs more here than
    # the work it does, and these run for every exchange.
    wl = ex.workload
    found = _workload_parts.get(id(wl))
    if found is None or found[0] is not wl:
        found = _parts_of(wl)
    _, who, before = found
    server_name, user_name, method, path = ex.server_name, ex.user_name, ex.method, ex.path
    if server_name is not None:
        before += f',"tls":{{"client":{{"server_name":{_json_raw(server_name)}}}}}'
    if user_name is not None:
        before += f',"user":{{"name":{_json_raw(user_name)}}}'
    if method is not None:
        if len(method) > MAX_RAW_FIELD_CHARS:
            method = _cut_text(method)
        before += f',"http":{{"request":{{"method":{_json_str(method)}}}'
    after = ""
    if path is not None:
        if len(path) > MAX_RAW_FIELD_CHARS:
            path = _cut_text(path)
        after = f',"url":{{"path":{_json_str(path)}}}'
    revision = ""
    decision = ex.decision
    if decision is not None:
        revision = f',"policy_revision":{decision.revision}'
        verdict = decision.verdict
        if verdict.rule is not None:
            ruleset = verdict.ruleset
            after += (
                f',"rule":{{"name":{_json_str(verdict.rule)},"ruleset":'
                f"{'null' if ruleset is None else _json_str(ruleset)}}}"
            )
    domain, ip, port = ex.destination_domain, ex.destination_ip, ex.destination_port
    parts = (
        shown,
        _json_str(ex.id),
        f'{{"ip":{_json_str(ex.source_ip)},"port":{ex.source_port}',
        f'{{"domain":{"null" if domain is None else _json_str(domain)},'
        f'"ip":{"null" if ip is None else _json_str(ip)},"port":{"null" if port is None else port}',
        f'{{"connection":{_json_str(ex.kind)},{who}',
        before,
        ex.method is not None,
        after,
        revision,
    )
    if ex.method is not None and ex.method != "CONNECT":
        # Kept for the close only when it comes a request later: a tunnel's (CONNECT, or a
        # transparent TLS or port-map connection's, with no method) can stay open for hours,
        # and its close often shows more (the SNI checked after the decision).
        ex.audit_parts = parts
    return parts


def _status_and_after(status: int | None, http_open: bool, after: str) -> str:
    """The response's status in `http` (closing it when open), then `after`; with no method,
    `http` holds only the status and comes last."""
    if http_open:
        if status is None:
            return "}" + after
        return f',"response":{{"status_code":{status}}}}}{after}'
    if status is None:
        return after
    return f'{after},"http":{{"response":{{"status_code":{status}}}}}'


def decision_line(ex: Exchange) -> bytes:
    """The record written once, when the request or tunnel is decided (or refused before that),
    as its line."""
    _, event_id, source, destination, outgate, before, http_open, after, revision = _parts(ex)
    decision = ex.decision
    status = ex.status
    allowed = decision is not None and decision.verdict.action is Outcome.ALLOW and status is None
    verdict = revision
    if decision is not None and decision.shadow is not None:
        shadow = decision.shadow
        verdict += (
            f',"shadow_decision":{_OUTCOMES[shadow.action]},"shadow_rule":'
            f'{_json_opt(shadow.rule)},"shadow_ruleset":{_json_opt(shadow.ruleset)}'
        )
    return (
        f'{{"@timestamp":"{_timestamp()}","event":{{"kind":"event","category":["network"],'
        f'"action":"decision","id":{event_id},"dataset":"outgate.audit",'
        f'{_ALLOWED if allowed else _DENIED},"source":{source}}},"destination":{destination}}},'
        f'"outgate":{outgate}{_outgate_extras(ex)}{_DECIDED_ALLOW if allowed else _DECIDED_DENY}'
        f"{'null' if ex.reason is None else _REASONS[ex.reason]}{verdict}}}{before}"
        f"{_status_and_after(status, http_open, after)}}}\n"
    ).encode("ascii")


_ALLOWED = '"outcome":"success","type":["connection","allowed"]}'
_DENIED = '"outcome":"failure","type":["connection","denied"]}'
_DECIDED_ALLOW = ',"decision":"allow","reason":'
_DECIDED_DENY = ',"decision":"deny","reason":'


def close_line(ex: Exchange, reason: Reason) -> bytes:
    """The record written once, when the request or tunnel ends (bytes, duration, status), as its
    line."""
    _, event_id, source, destination, outgate, before, http_open, after, revision = _parts(ex)
    decision = ex.decision
    verdict = ""
    if decision is not None:
        verdict = (
            f',"decision":{_OUTCOMES[decision.verdict.action] if ex.decided else _DENY}{revision}'
        )
    return (
        f'{{"@timestamp":"{_timestamp()}","event":{{"kind":"event","category":["network"],'
        f'"action":"close","id":{event_id},"dataset":"outgate.audit","outcome":'
        f'{_SUCCESS if reason is Reason.COMPLETED else _FAILURE},"type":["connection","end"],'
        f'"duration":{int((time.monotonic() - ex.started) * 1e9)}}},"source":{source},'
        f'"bytes":{ex.source_bytes}}},"destination":{destination},'
        f'"bytes":{ex.destination_bytes}}},"outgate":{outgate}{_outgate_extras(ex)}'
        f',"reason":{_REASONS[reason]}{verdict}}}{before}'
        f"{_status_and_after(ex.status, http_open, after)}}}\n"
    ).encode("ascii")


_SUCCESS = '"success"'
_FAILURE = '"failure"'
_DENY = '"deny"'


def decision_record(ex: Exchange) -> dict[str, Any]:
    """The decision record as a dict (`decision_line` parsed), for tools and tests."""
    record: dict[str, Any] = json.loads(decision_line(ex))
    return record


def close_record(ex: Exchange, reason: Reason) -> dict[str, Any]:
    """The close record as a dict (`close_line` parsed), for tools and tests."""
    record: dict[str, Any] = json.loads(close_line(ex, reason))
    return record


def render(record: dict[str, Any]) -> bytes:
    """A record given as a dict, as its line: the text `decision_line` and `close_line` write
    (json with ensure_ascii, no spaces). orjson renders in about a tenth of json's time and
    escapes control characters the same way; it leaves non-ASCII and DEL raw, so a line holding
    either is rendered again by json."""
    line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    if line.isascii() and b"\x7f" not in line:
        return line
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def _open_log(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)


class AuditSink:
    """Ordered, lossless, non-blocking for the event loop; a thread does the blocking writes."""

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        self._json = True
        # The counter's children, looked up once (a labels() call costs more than the line).
        self._counted = {
            action: metrics.AUDIT_RECORDS.labels(action=action) for action in ("decision", "close")
        }
        self._squid: LogFormat | None = None  # set by configure() when Squid lines are wanted
        self._squid_fd = fd
        self._squid_path: str | None = None  # the file Squid lines go to, reopened on SIGUSR1
        self._owned_fds: list[int] = []
        # Descriptors replaced by reopen(): closed by the writer once the lines queued for them
        # before the swap are written.
        self._retired_fds: list[int] = []
        self._lines: deque[tuple[int, bytes]] = deque()  # (fd, line), written in this order
        self._pending = 0
        # The condition's lock, taken directly (a C-level context manager) where no wait or
        # notify is needed: that is twice per request.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closing = False
        self._thread = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake_scheduled = False
        self._drain_waiters: list[Callable[[], None]] = []
        self._congested_since: float | None = None
        self._thread.start()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Records emitted on `loop`'s thread wake the writer once per WRITER_WAKE_DELAY, not
        once per line (see there)."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def configure(self, settings: Settings) -> None:
        """Choose the line formats from `audit.format` before the first record. Opens
        `audit.squidOutput` (append, created 0640) when it is a file; ConfigError if it cannot."""
        squid = settings.audit_format in ("squid", "both")
        fd = self._fd
        if squid and settings.audit_squid_output != "stdout":
            path = settings.audit_squid_output
            try:
                fd = _open_log(path)
            except OSError as exc:
                issue = ConfigIssue(
                    file=settings.source,
                    document=None,
                    path="audit.squidOutput",
                    message=f"cannot open {path!r} for appending: {exc.strerror}",
                    fix="point it at a writable file, e.g. on an emptyDir volume",
                )
                raise ConfigError([issue]) from None
            self._owned_fds.append(fd)
            self._squid_path = path
        with self._cond:
            self._json = settings.audit_format in ("json", "both")
            self._squid = parse_logformat(settings.audit_squid_logformat) if squid else None
            self._squid_fd = fd

    def reopen(self) -> bool:
        """Open the Squid-format file again by its path (after logrotate renamed it; SIGUSR1,
        as Squid's `-k rotate`). Lines queued before this call go to the old file, every later
        line to the new one, and none is lost. If the path cannot be opened, lines keep going
        to the open file and the error is logged. False when there is no file to reopen."""
        path = self._squid_path
        if path is None:
            return False
        try:
            fd = _open_log(path)
        except OSError as exc:
            log.error("audit_reopen_failed", path=path, error=exc.strerror)
            return False
        with self._cond:
            old, self._squid_fd = self._squid_fd, fd
            self._owned_fds.append(fd)
            self._owned_fds.remove(old)
            self._retired_fds.append(old)
            self._cond.notify()
        log.info("audit_files_reopened", path=path)
        return True

    @property
    def backlog_bytes(self) -> int:
        """Bytes of lines waiting for the writer thread (the admin page shows it)."""
        return self._pending

    @property
    def congested(self) -> bool:
        return self._pending > HIGH_WATER_BYTES

    def call_when_drained(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the event loop once the backlog is under the low-water mark."""
        self._drain_waiters.append(callback)

    def emit_line(self, action: str, line: bytes) -> None:
        """Write one record's line (`action`: decision or close)."""
        self._counted[action].inc()
        if self._json:
            self._enqueue(self._fd, line)

    def _enqueue(self, fd: int, line: bytes) -> None:
        with self._lock:
            self._lines.append((fd, line))
            self._pending += len(line)
            if self._pending > HIGH_WATER_BYTES and self._congested_since is None:
                self._congested_since = time.monotonic()
            loop = self._loop
            if loop is None or threading.get_ident() != self._loop_thread or not loop.is_running():
                self._cond.notify()
                return
        if not self._wake_scheduled:
            self._wake_scheduled = True
            loop.call_later(WRITER_WAKE_DELAY, self._wake_writer)

    def _wake_writer(self) -> None:
        self._wake_scheduled = False
        with self._cond:
            self._cond.notify()

    def decision(self, ex: Exchange) -> None:
        self.emit_line("decision", decision_line(ex))

    def close(self, ex: Exchange, reason: Reason) -> None:
        if ex.closed:
            return
        ex.closed = True
        self.emit_line("close", close_line(ex, reason))
        if self._squid is not None:
            self._enqueue(self._squid_fd, squid_line(ex, str(reason), self._squid))

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._closing and not self._retired_fds:
                    self._cond.wait()
                if not self._lines and self._closing:
                    self._close_retired(self._take_retired())
                    return
                by_fd: dict[int, list[bytes]] = {}
                for fd, line in self._lines:
                    by_fd.setdefault(fd, []).append(line)
                self._lines.clear()
                retired = self._take_retired()
            size = 0
            for fd, lines in by_fd.items():
                batch = b"".join(lines)
                size += len(batch)
                self._write_all(fd, batch)
            # Every line for a retired descriptor was queued before it was retired, so it was
            # in this batch or an earlier one.
            self._close_retired(retired)
            with self._cond:
                self._pending -= size
                drained = self._pending <= LOW_WATER_BYTES and self._congested_since is not None
                if drained and self._congested_since is not None:
                    metrics.AUDIT_BACKPRESSURE.inc(time.monotonic() - self._congested_since)
                    self._congested_since = None
            if drained and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._wake_drain_waiters)

    def _take_retired(self) -> list[int]:
        retired, self._retired_fds = self._retired_fds, []
        return retired

    @staticmethod
    def _close_retired(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    @staticmethod
    def _write_all(fd: int, batch: bytes) -> None:
        write_all(fd, batch)

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
        if not self._thread.is_alive():
            for fd in self._owned_fds:
                os.close(fd)
            self._owned_fds.clear()
