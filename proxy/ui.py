"""The read-only admin page (issue 15): who calls what, what was refused, the policy that fits.

Server-rendered HTML on the admin listener under `/ui`, no JavaScript, no external assets, no
build step:

  /ui                   overview: decisions per second, allowed against denied, a chart of the
                        last hour (SVG), top denied destinations, workloads, recent refusals,
                        proxy health (readiness, policy revision, informer sync, audit backlog)
  /ui/workload?ns=&kind=&name=
                        one workload's destinations (denials first, `would be denied` rows
                        marked) and the policy `outgate suggest` would write from them
  /ui/policies          the policies in force, with tier, mode, priority, and load problems
  /ui/explain?source=&url=[&resolve=1]
                        the explain form and every evaluation step (proxy.explainer)
  /ui/style.css         the page's one stylesheet

Safety: every value is HTML-escaped where it is written (`_e`), whatever its origin; nothing on
the page changes state (every route is a GET that reads); each answer carries a strict
Content-Security-Policy (no script at all, styles only from /ui/style.css) and refuses framing.
`ui.enabled: false` leaves the routes out; `ui.tokenFile` makes every /ui request carry
`Authorization: Bearer <token>` (docs/ui.md).
"""

from __future__ import annotations

import hmac
import html
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

from aiohttp import web

from proxy.adoption.suggest import SuggestOptions, WorkloadKey
from proxy.config import Settings
from proxy.core.identity import IdentityLookup
from proxy.core.policy.model import PolicyKind
from proxy.dataplane.router import Router
from proxy.errors import ConfigError, ConfigIssue, OutgateError
from proxy.explainer import explain, explain_route
from proxy.traffic import (
    OTHER_WORKLOADS_KEY,
    UNKNOWN_KEY,
    Minute,
    Row,
    TrafficAggregate,
    rfc3339,
)

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
TOP_DENIED_SHOWN: Final = 20
# The window over which the overview's decisions per second is averaged.
RATE_MINUTES: Final = 5
# The longest token file read: a bearer token is tens of bytes.
MAX_TOKEN_BYTES: Final = 4096

STYLESHEET: Final = """\
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2230;background:#f6f7f9}
header{background:#1d2230;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:center}
header a{color:#cfd8ff;text-decoration:none}header strong{font-size:16px}
main{padding:16px 20px;max-width:1400px}
h2{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%;margin-bottom:8px}
th,td{border:1px solid #dde1e8;padding:4px 8px;text-align:left;vertical-align:top;
overflow-wrap:anywhere}
#health th{width:200px}
th{background:#eef0f4;font-weight:600;overflow-wrap:normal}
td.n{text-align:right;font-variant-numeric:tabular-nums;overflow-wrap:normal}
tr.denied td{background:#fde8e8}tr.would-deny td{background:#fff4d6}
tr.other td{color:#667}
.tag{display:inline-block;padding:0 6px;border-radius:3px;font-size:12px}
.tag.deny{background:#c62828;color:#fff}.tag.shadow{background:#f9a825;color:#000}
.tag.ok{background:#2e7d32;color:#fff}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #dde1e8;padding:10px 14px;min-width:150px}
.card .v{font-size:22px;font-weight:600}
pre{background:#fff;border:1px solid #dde1e8;padding:10px;overflow:auto;white-space:pre-wrap}
svg .allowed{fill:#4a7bd0}svg .denied{fill:#c62828}svg .axis{stroke:#99a;fill:none}
svg text{font-size:10px;fill:#556}
form label{margin-right:12px}input[type=text]{width:320px}
.note{color:#556;font-size:13px}
"""


def _e(value: object) -> str:
    """Escape for HTML text and quoted attribute values."""
    return html.escape(str(value), quote=True)


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def _ago(then: float, now: float) -> str:
    seconds = max(0, int(now - then))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _when(then: float, now: float) -> str:
    return f'<span title="{_e(rfc3339(then))}">{_e(_ago(then, now))}</span>'


def _workload_link(key: WorkloadKey) -> str:
    query = urlencode({"ns": key.namespace, "kind": key.owner_kind, "name": key.owner_name})
    return f'<a href="/ui/workload?{_e(query)}">{_e(_describe(key))}</a>'


def _describe(key: WorkloadKey) -> str:
    if key in (UNKNOWN_KEY, OTHER_WORKLOADS_KEY):
        return key.owner_name
    return str(key)


def _table(headers: Iterable[str], rows: Iterable[str], *, table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(rows)
    return f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)} - Outgate</title>"
        '<link rel="stylesheet" href="/ui/style.css"></head><body>'
        '<header><strong>Outgate</strong><a href="/ui">Overview</a>'
        '<a href="/ui/policies">Policies</a><a href="/ui/explain">Explain</a>'
        f'<span class="note">worker pid {os.getpid()}</span></header>'
        f"<main><h1>{_e(title)}</h1>{body}</main></body></html>"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class UiSources:
    """What the page reads, handed in by the composition root (proxy.app)."""

    router: Router
    traffic: TrafficAggregate
    readiness: Callable[[], tuple[bool, dict[str, Any]]]
    audit_backlog: Callable[[], int]
    suggest_options: SuggestOptions
    identity: IdentityLookup  # who a source is, for explain (as the admin /explain asks it)


# -- overview --------------------------------------------------------------------------------


def _chart(minutes: list[Minute]) -> str:
    """Decisions per minute over the last hour, allowed under denied, as inline SVG."""
    width, height, left, bottom = 720, 160, 40, 20
    peak = max((m.allowed + m.denied for m in minutes), default=0) or 1
    bar = (width - left) / len(minutes)
    parts = [
        f'<svg id="decisions-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="Decisions per minute, last hour: allowed (blue) and denied (red)">',
        f'<path class="axis" d="M{left} 0V{height - bottom}H{width}"/>',
        f'<text x="0" y="10">{peak}</text><text x="0" y="{height - bottom}">0</text>',
        f'<text x="{left}" y="{height - 4}">-60 min</text>'
        f'<text x="{width - 30}" y="{height - 4}">now</text>',
    ]
    scale = (height - bottom - 4) / peak
    for index, minute in enumerate(minutes):
        x = left + index * bar
        allowed_h = minute.allowed * scale
        denied_h = minute.denied * scale
        base = height - bottom
        label = f"{rfc3339(minute.start)}: {minute.allowed} allowed, {minute.denied} denied"
        if minute.allowed:
            parts.append(
                f'<rect class="allowed" x="{x:.1f}" y="{base - allowed_h:.1f}" '
                f'width="{bar - 1:.1f}" height="{allowed_h:.1f}"><title>{_e(label)}</title></rect>'
            )
        if minute.denied:
            parts.append(
                f'<rect class="denied" x="{x:.1f}" y="{base - allowed_h - denied_h:.1f}" '
                f'width="{bar - 1:.1f}" height="{denied_h:.1f}"><title>{_e(label)}</title></rect>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _health(sources: UiSources) -> str:
    ready, detail = sources.readiness()
    kube = detail.get("kubernetes")
    synced = "not used"
    if isinstance(kube, Mapping):
        resources = kube.get("synced") or {}
        synced = ", ".join(f"{name}: {'synced' if ok else 'NOT synced'}"
                           for name, ok in sorted(resources.items())) or "none"  # fmt: skip
    errors = detail.get("last_policy_error") or []
    rows = [
        ("Ready", "yes" if ready else "NO", "health-ready"),
        ("Policy revision", detail.get("policy_revision"), "health-revision"),
        ("Policy loaded", "yes" if detail.get("policy_loaded") else "NO", "health-loaded"),
        ("Last policy load", "failed" if errors else "ok", "health-reload"),
        ("Informers", synced, "health-informers"),
        ("Audit backlog", _bytes(sources.audit_backlog()), "health-audit-backlog"),
        ("Draining", "yes" if detail.get("draining") else "no", "health-draining"),
    ]
    body = "".join(f'<tr><th>{_e(k)}</th><td id="{_e(i)}">{_e(v)}</td></tr>' for k, v, i in rows)
    return f'<table id="health">{body}</table>'


def overview(sources: UiSources) -> str:
    traffic = sources.traffic
    now = time.time()
    minutes = traffic.minutes(now)
    recent = minutes[-RATE_MINUTES:]
    per_second = sum(m.allowed + m.denied for m in recent) / (RATE_MINUTES * 60)
    total = traffic.allowed + traffic.denied
    cards = [
        ("Decisions/s", f"{per_second:.2f}", f"average over the last {RATE_MINUTES} minutes",
         "rate"),
        ("Allowed", traffic.allowed, "since the proxy started", "allowed-total"),
        ("Denied", traffic.denied, "since the proxy started", "denied-total"),
        ("Decisions", total, "since the proxy started", "decisions-total"),
        ("Shadow differences", traffic.shadow_differences,
         "audit-mode policies would decide otherwise", "shadow-total"),
    ]  # fmt: skip
    card_html = "".join(
        f'<div class="card"><div>{_e(name)}</div><div class="v" id="{_e(i)}">{_e(value)}</div>'
        f'<div class="note">{_e(note)}</div></div>'
        for name, value, note, i in cards
    )
    denied_rows = [
        f"<tr><td>{_workload_link(t.key)}</td><td>{_e(_destination(row))}</td>"
        f'<td class="n">{row.denied}</td><td>{_e(row.last_reason or "")}</td>'
        f"<td>{_when(row.last_seen, now)}</td></tr>"
        for t, row in traffic.top_denied(TOP_DENIED_SHOWN)
    ]
    workloads = sorted(traffic.workloads.values(), key=lambda t: (-t.denied, -t.requests))
    workload_rows = []
    for t in workloads:
        hour = traffic.minutes(now, t)
        workload_rows.append(
            f"<tr><td>{_workload_link(t.key)}</td><td class='n'>{t.requests}</td>"
            f"<td class='n'>{t.denied}</td>"
            f"<td class='n'>{sum(m.allowed for m in hour)}/{sum(m.denied for m in hour)}</td>"
            f"<td class='n'>{len(t.rows)}</td><td>{_when(t.last_seen, now)}</td></tr>"
        )
    refusal_rows = [
        f"<tr><td>{_when(r.at, now)}</td><td>{_e(r.workload)}</td><td>{_e(r.destination)}</td>"
        f"<td>{_e(r.reason)}</td><td>{_e(r.status or '')}</td><td>{_e(r.method or '')}</td>"
        f"<td>{_e(r.target or '')}</td><td>{_e(r.host_field or '')}</td>"
        f"<td>{_e(r.user_agent or '')}</td><td>{_e(r.event_id)}</td></tr>"
        for r in reversed(traffic.refusals)
    ]
    body = (
        f'<div class="cards">{card_html}</div>'
        "<h2>Decisions per minute, last hour</h2>"
        f"{_chart(minutes)}"
        '<p class="note">Blue: allowed. Red: denied. One bar a minute.</p>'
        "<h2>Proxy health</h2>"
        f"{_health(sources)}"
        "<h2>Top denied destinations</h2>"
        + _table(
            ["Workload", "Destination", "Denied", "Last reason", "Last seen"],
            denied_rows,
            table_id="top-denied",
        )
        + "<h2>Workloads</h2>"
        + _table(
            [
                "Workload",
                "Requests",
                "Denied",
                "Last hour (allowed/denied)",
                "Destinations",
                "Last seen",
            ],
            workload_rows,
            table_id="workloads",
        )
        + "<h2>Recent refusals</h2>"
        '<p class="note">What the client sent, as sent (cut to 200 characters).</p>'
        + _table(
            [
                "When",
                "Workload",
                "Destination",
                "Reason",
                "Status",
                "Method",
                "Target",
                "Host",
                "User-Agent",
                "Event id",
            ],
            refusal_rows,
            table_id="refusals",
        )
    )
    return _page("Overview", body)


def _destination(row: Row) -> str:
    return "other" if row.port == 0 and not row.named else f"{row.host}:{row.port}"


# -- one workload ----------------------------------------------------------------------------


def workload_page(sources: UiSources, key: WorkloadKey) -> str | None:
    traffic = sources.traffic.workloads.get(key)
    if traffic is None:
        return None
    now = time.time()
    rows = []
    for row in sources.traffic.shown_rows(traffic):
        css = "denied" if row.denied else ("would-deny" if row.would_be_denied else "")
        if row is traffic.other:
            css = "other"
        tags = ""
        if row.denied:
            tags += '<span class="tag deny">denied</span> '
        if row.would_be_denied:
            tags += '<span class="tag shadow">would be denied</span> '
        shadow = ""
        if row.shadow_action is not None:
            shadow = f"{row.shadow_action} ({row.shadow_rule or 'default'})"
        name = "other destinations (folded)" if row is traffic.other else _destination(row)
        rows.append(
            f'<tr class="{css}"><td>{tags}{_e(name)}</td>'
            f'<td class="n">{row.allowed}</td><td class="n">{row.denied}</td>'
            f'<td class="n">{row.tunnels_allowed}/{row.tunnels_denied}</td>'
            f'<td class="n">{_e(_bytes(row.bytes_out))}</td>'
            f'<td class="n">{_e(_bytes(row.bytes_in))}</td>'
            f"<td>{_e(row.rule or '')}</td><td>{_e(row.last_reason or '')}</td>"
            f"<td>{_e(shadow)}</td><td>{_when(row.last_seen, now)}</td></tr>"
        )
    suggestion = sources.traffic.suggestion(key, sources.suggest_options)
    if suggestion is None:
        policy = '<p class="note">No policy is proposed for this entry.</p>'
    else:
        folded = traffic.other.requests
        note = (
            f" {folded} requests went to destinations folded into 'other' and are not in it."
            if folded
            else ""
        )
        policy = (
            '<p class="note">What <code>outgate suggest</code> would write from what this '
            "worker saw, in <code>mode: audit</code>: apply it, watch the shadow decisions "
            f"here, then switch it to enforce.{_e(note)}</p>"
            f'<pre id="suggested-policy">{_e(suggestion.to_yaml())}</pre>'
        )
    body = (
        f"<p>{traffic.requests} requests, {traffic.denied} denied, "
        f"{traffic.undestined} refused before a destination was known.</p>"
        "<h2>Decisions per minute, last hour</h2>"
        f"{_chart(sources.traffic.minutes(now, traffic))}"
        "<h2>Destinations</h2>"
        '<p class="note">Denials first, then rows an audit-mode policy would deny.</p>'
        + _table(
            [
                "Destination",
                "Allowed",
                "Denied",
                "Tunnels (allowed/denied)",
                "Bytes out",
                "Bytes in",
                "Deciding rule",
                "Last reason",
                "Shadow decision",
                "Last seen",
            ],
            rows,
            table_id="destinations",
        )
        + "<h2>Suggested policy</h2>"
        + policy
    )
    return _page(_describe(key), body)


# -- policies --------------------------------------------------------------------------------


def policies_page(sources: UiSources) -> str:
    engine = sources.router.engine
    rows = [
        f"<tr><td>{_e(policy.kind)}</td><td>{_e(policy.ruleset)}</td><td>{_e(policy.tier)}</td>"
        f"<td>{_e(policy.mode)}</td>"
        f"<td class='n'>{_e(policy.priority if policy.kind is PolicyKind.CLUSTER else '-')}</td>"
        f"<td class='n'>{len(policy.rules)}</td><td>{_e(policy.origin.file)}</td></tr>"
        for policy in engine.policies
    ]
    _, detail = sources.readiness()
    problems = [str(p) for p in detail.get("last_policy_error") or []]
    kube = detail.get("kubernetes")
    if isinstance(kube, Mapping):
        problems += [str(p) for p in kube.get("invalid_policies") or []]
    problem_html = (
        "<ul id='policy-problems'>" + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>"
        if problems
        else "<p id='policy-problems'>None: every policy loaded.</p>"
    )
    body = (
        f"<p>Revision {engine.revision}, default action {_e(engine.default_action)}, "
        f"{engine.rule_count} rules.</p>"
        + _table(
            ["Kind", "Name", "Tier", "Mode", "Priority", "Rules", "Source"],
            rows,
            table_id="policies",
        )
        + "<h2>Validation problems</h2>"
        + '<p class="note">A file that fails to load keeps the last good policy in force; '
        "an invalid cluster object is left out.</p>" + problem_html
    )
    return _page("Policies", body)


# -- explain ---------------------------------------------------------------------------------


async def explain_page(sources: UiSources, query: Mapping[str, str]) -> str:
    source = query.get("source", "")
    url = query.get("url", "")
    resolve = query.get("resolve", "") in ("1", "on", "true", "yes")
    result = ""
    if source and url:
        try:
            if resolve:
                text, _ = await explain_route(
                    sources.router, sources.identity, source=source, url=url
                )
            else:
                text, _ = explain(sources.router, sources.identity, source=source,
                                  url=url)  # fmt: skip
            result = f'<h2>Result</h2><pre id="explanation">{_e(text)}</pre>'
        except OutgateError as exc:
            result = (
                f'<h2>Result</h2><pre id="explanation">{_e(exc.message)} ({_e(exc.reason)})</pre>'
            )
    checked = " checked" if resolve else ""
    form = (
        '<form method="get" action="/ui/explain">'
        f'<label>Source IP <input type="text" name="source" value="{_e(source)}"></label>'
        f'<label>URL <input type="text" name="url" value="{_e(url)}"></label>'
        f'<label><input type="checkbox" name="resolve" value="1"{checked}> resolve (DNS, '
        "address guard)</label>"
        '<button type="submit">Explain</button></form>'
        '<p class="note">The same evaluation the proxy runs, with every step shown. Nothing is '
        "sent to the destination; with resolve, the proxy asks DNS.</p>"
    )
    return _page("Explain", form + result)


# -- the routes ------------------------------------------------------------------------------


def load_token(settings: Settings) -> str | None:
    """The bearer token of `ui.tokenFile`, read at start; ConfigError when it cannot be."""
    path = settings.ui_token_file
    if path is None:
        return None
    try:
        raw = Path(path).read_bytes()[: MAX_TOKEN_BYTES + 1]
        token = raw.decode("ascii").strip()
        problem = (
            "is longer than 4096 bytes"
            if len(raw) > MAX_TOKEN_BYTES
            else ("is empty" if not token else None)
        )
    except OSError as exc:
        problem = f"cannot be read: {exc.strerror}"
    except UnicodeDecodeError:
        problem = "is not ASCII"
    if problem is None:
        return token
    issue = ConfigIssue(
        file=settings.source,
        document=None,
        path="ui.tokenFile",
        message=f"{path} {problem}",
        fix="point it at a file holding one ASCII token (a mounted Secret key), "
        "or remove ui.tokenFile",
    )
    raise ConfigError([issue])


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_ui_routes(app: web.Application, sources: UiSources, *, token: str | None) -> None:
    """Register /ui and its pages on the admin app; every answer carries SECURITY_HEADERS."""
    expected = None if token is None else f"Bearer {token}".encode()

    def guarded(handler: Handler) -> Handler:
        async def wrapper(request: web.Request) -> web.StreamResponse:
            if expected is not None:
                given = request.headers.get("Authorization", "").encode("latin-1", "replace")
                if not hmac.compare_digest(given, expected):
                    return web.Response(
                        status=401,
                        text="a bearer token is required (ui.tokenFile)\n",
                        headers={
                            **SECURITY_HEADERS,
                            "WWW-Authenticate": 'Bearer realm="outgate-ui"',
                        },
                    )
            response = await handler(request)
            response.headers.update(SECURITY_HEADERS)
            return response

        return wrapper

    def html_response(text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")

    async def overview_handler(_: web.Request) -> web.StreamResponse:
        return html_response(overview(sources))

    async def workload_handler(request: web.Request) -> web.StreamResponse:
        query = request.query
        key = WorkloadKey(query.get("ns", ""), query.get("kind", ""), query.get("name", ""))
        page = workload_page(sources, key)
        if page is None:
            return html_response(_page("Not found", "<p>No traffic from this workload.</p>"), 404)
        return html_response(page)

    async def policies_handler(_: web.Request) -> web.StreamResponse:
        return html_response(policies_page(sources))

    async def explain_handler(request: web.Request) -> web.StreamResponse:
        return html_response(await explain_page(sources, request.query))

    async def style_handler(_: web.Request) -> web.StreamResponse:
        return web.Response(text=STYLESHEET, content_type="text/css", charset="utf-8")

    app.router.add_get("/ui", guarded(overview_handler))
    app.router.add_get("/ui/workload", guarded(workload_handler))
    app.router.add_get("/ui/policies", guarded(policies_handler))
    app.router.add_get("/ui/explain", guarded(explain_handler))
    app.router.add_get("/ui/style.css", guarded(style_handler))
