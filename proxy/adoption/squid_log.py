"""Squid's access.log line for one finished request or tunnel: pure formatting, no I/O.

The audit sink calls `squid_line` once per close record when `audit.format` is `squid` or
`both`, so a SIEM parser or dashboard built for Squid keeps working during a migration. The
default layout is Squid's native one (squid.conf `logformat squid`):

    %ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt
    time      elapsed client code/status bytes method URL user hierarchy/peer type

`audit.squidLogformat` takes `squid`, `common`, `combined` or a format string built from the
subset of Squid's logformat codes in `CODES`; anything else is refused when the config loads.

Where Outgate knows less than Squid, the field says so the way Squid does for a missing value:
  - `%<st` counts body bytes relayed to the client (Squid adds the reply headers); a refusal
    counts 0 (Squid counts its error page).
  - `%mt` (reply content type), `%ui` (ident) and `%>h` (request headers) are `-`: Outgate does
    not record them. `%un`/`%ul` are the proxy-auth user (auth.basic), `-` without one.
  - `%ru` drops the query string, as Squid does by default (`strip_query_terms on`): queries
    carry tokens.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

NATIVE_FORMAT: Final = "%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt"
COMMON_FORMAT: Final = '%>a %[ui %[un [%tl] "%rm %ru HTTP/%rv" %>Hs %<st %Ss:%Sh'
COMBINED_FORMAT: Final = (
    '%>a %[ui %[un [%tl] "%rm %ru HTTP/%rv" %>Hs %<st "%{Referer}>h" "%{User-Agent}>h" %Ss:%Sh'
)
# Squid's built-in format names (squid.conf `access_log ... squid|common|combined`).
NAMED_FORMATS: Final[Mapping[str, str]] = {
    "squid": NATIVE_FORMAT,
    "common": COMMON_FORMAT,
    "combined": COMBINED_FORMAT,
}

# `%{key}note` keys: Outgate's decision facts, for SIEM rules that want them on the Squid line.
NOTE_KEYS: Final = (
    "id",
    "decision",
    "reason",
    "rule",
    "ruleset",
    "namespace",
    "pod",
    "workload",
)

# Squid's time layout for %tl / %tg (Apache common log format).
_CLF_TIME = "%d/%b/%Y:%H:%M:%S %z"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessEntry:
    """What one access.log line says, already in Squid's vocabulary."""

    end_time: float  # seconds since the epoch, when the request or tunnel ended
    elapsed_ms: int
    client_ip: str
    client_port: int
    method: str  # "NONE" when the request could not be parsed, as Squid logs it
    url: str
    scheme: str  # "http" for forwarded requests, "-" for tunnels
    path: str
    host: str
    status: int  # sent to the client; 0 when nothing was (Squid prints 000)
    result: str  # %Ss: TCP_MISS, TCP_TUNNEL, TCP_DENIED, TAG_NONE, with _ABORTED/_TIMEDOUT
    hierarchy: str  # %Sh: HIER_DIRECT or HIER_NONE
    server_ip: str | None
    server_port: int | None
    bytes_to_client: int
    bytes_from_client: int
    user: str | None = None  # the proxy-auth user name (%un)
    notes: Mapping[str, str] = field(default_factory=dict)


class _WorkloadLike(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def owner_kind(self) -> str: ...
    @property
    def owner_name(self) -> str: ...


class _DecisionLike(Protocol):
    @property
    def rule(self) -> str | None: ...
    @property
    def ruleset(self) -> str | None: ...


class ExchangeLike(Protocol):
    """The fields of `proxy.audit.Exchange` this module reads (kept structural: no import)."""

    @property
    def kind(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def source_ip(self) -> str: ...
    @property
    def source_port(self) -> int: ...
    @property
    def workload(self) -> _WorkloadLike: ...
    @property
    def started(self) -> float: ...
    @property
    def destination_domain(self) -> str | None: ...
    @property
    def destination_ip(self) -> str | None: ...
    @property
    def destination_port(self) -> int | None: ...
    @property
    def method(self) -> str | None: ...
    @property
    def path(self) -> str | None: ...
    @property
    def decision(self) -> _DecisionLike | None: ...
    @property
    def reason(self) -> object: ...
    @property
    def status(self) -> int | None: ...
    @property
    def source_bytes(self) -> int: ...
    @property
    def destination_bytes(self) -> int: ...
    @property
    def decided(self) -> bool: ...
    @property
    def user_name(self) -> str | None: ...


# Statuses of requests refused before they were understood: Squid logs these as TAG_NONE.
_UNPARSED_STATUSES = frozenset({400, 408, 414, 431, 505})
# Statuses of refusals by policy or limits: TCP_DENIED.
_DENIED_STATUSES = frozenset({403, 407, 429, 503})
_ABORTED_REASONS = frozenset({"client_closed", "drained"})
_TIMEDOUT_REASONS = frozenset({"idle_timeout", "upstream_timeout"})


# Exchange kinds that are a tunnel (a CONNECT, or a transparent TLS connection or port map, issue
# 13): Squid logs its own intercepted TLS the same way, `TCP_TUNNEL/200 CONNECT host:port`.
TUNNEL_KINDS = frozenset({"tunnel", "transparent-tls", "port-map"})


def result_code(*, kind: str, decided: bool, status: int | None, close_reason: str) -> str:
    """Squid's %Ss for one request: what happened, in the words Squid parsers key on."""
    if not decided:
        if status in _UNPARSED_STATUSES:
            return "TAG_NONE"
        if status in _DENIED_STATUSES:
            return "TCP_DENIED"
        # Allowed by policy, then DNS or the upstream failed: Squid calls that a miss.
        return "TCP_MISS"
    base = "TCP_TUNNEL" if kind in TUNNEL_KINDS else "TCP_MISS"
    if close_reason in _ABORTED_REASONS:
        return f"{base}_ABORTED"
    if close_reason in _TIMEDOUT_REASONS:
        return f"{base}_TIMEDOUT"
    return base


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def access_entry(
    ex: ExchangeLike, close_reason: str, *, end_time: float, now_monotonic: float
) -> AccessEntry:
    """Build the entry for a finished exchange. Times come in so the caller (and tests) own
    the clock."""
    host = ex.destination_domain or ex.destination_ip or ""
    port = ex.destination_port
    tunnel = ex.kind in TUNNEL_KINDS
    method = ex.method or ("CONNECT" if tunnel else "NONE")
    if not host or port is None:
        url, scheme, path = "error:invalid-request", "-", "-"
    elif tunnel:
        url, scheme, path = f"{_url_host(host)}:{port}", "-", "-"
    else:
        path = (ex.path or "/").split("?", 1)[0].split("#", 1)[0]
        authority = _url_host(host) if port == 80 else f"{_url_host(host)}:{port}"
        url, scheme = f"http://{authority}{path}", "http"
    status = ex.status
    if status is None and ex.decided and tunnel:
        status = 200  # the CONNECT was answered 200; later failures close the tunnel
    direct = ex.decided and ex.destination_ip is not None
    workload = ex.workload
    decision = ex.decision
    notes: dict[str, str] = {
        "id": ex.id,
        "decision": "allow" if ex.decided else "deny",
        "reason": str(ex.reason) if ex.reason is not None else close_reason,
        "namespace": workload.namespace,
        "pod": workload.name,
        "workload": f"{workload.owner_kind}/{workload.owner_name}" if workload.owner_kind else "",
    }
    if decision is not None:
        notes["rule"] = decision.rule or ""
        notes["ruleset"] = decision.ruleset or ""
    return AccessEntry(
        end_time=end_time,
        elapsed_ms=max(0, round((now_monotonic - ex.started) * 1000)),
        client_ip=ex.source_ip,
        client_port=ex.source_port,
        method=method,
        url=url,
        scheme=scheme,
        path=path,
        host=host or "-",
        status=status or 0,
        result=result_code(
            kind=ex.kind, decided=ex.decided, status=ex.status, close_reason=close_reason
        ),
        hierarchy="HIER_DIRECT" if direct else "HIER_NONE",
        server_ip=ex.destination_ip if direct else None,
        server_port=port if direct else None,
        bytes_to_client=ex.destination_bytes,
        bytes_from_client=ex.source_bytes,
        user=ex.user_name,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Format strings
# --------------------------------------------------------------------------------------------


def _clf_time(entry: AccessEntry, arg: str | None, *, utc: bool) -> str:
    moment = time.gmtime(entry.end_time) if utc else time.localtime(entry.end_time)
    return time.strftime(arg or _CLF_TIME, moment)


def _dash(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


_Getter = Callable[[AccessEntry, "str | None"], str]

# Every supported code and how it reads an entry. Squid's codes not listed here are refused at
# config load rather than printed as "-", so an operator never ships a format that lies.
CODES: Final[Mapping[str, _Getter]] = {
    # Seconds and milliseconds from one rounding, so .999 never rounds up alone.
    "ts": lambda e, _: str(round(e.end_time * 1000) // 1000),
    "tu": lambda e, _: str(round(e.end_time * 1000) % 1000),
    "tl": lambda e, arg: _clf_time(e, arg, utc=False),
    "tg": lambda e, arg: _clf_time(e, arg, utc=True),
    "tr": lambda e, _: str(e.elapsed_ms),
    ">a": lambda e, _: e.client_ip,
    ">A": lambda e, _: e.client_ip,
    ">p": lambda e, _: str(e.client_port),
    "<a": lambda e, _: _dash(e.server_ip),
    "<A": lambda e, _: _dash(e.server_ip),
    "<p": lambda e, _: _dash(e.server_port),
    "Ss": lambda e, _: e.result,
    "Sh": lambda e, _: e.hierarchy,
    ">Hs": lambda e, _: str(e.status),
    "<Hs": lambda e, _: str(e.status) if e.hierarchy == "HIER_DIRECT" else "-",
    "Hs": lambda e, _: str(e.status),
    "<st": lambda e, _: str(e.bytes_to_client),
    ">st": lambda e, _: str(e.bytes_from_client),
    "st": lambda e, _: str(e.bytes_to_client + e.bytes_from_client),
    "rm": lambda e, _: e.method,
    "ru": lambda e, _: e.url,
    ">ru": lambda e, _: e.url,
    "rp": lambda e, _: e.path,
    ">rp": lambda e, _: e.path,
    "rd": lambda e, _: e.host,
    ">rd": lambda e, _: e.host,
    "rs": lambda e, _: e.scheme,
    ">rs": lambda e, _: e.scheme,
    "rv": lambda e, _: "1.1",
    "un": lambda e, _: _dash(e.user),
    "ul": lambda e, _: _dash(e.user),
    "ui": lambda e, _: "-",
    "mt": lambda e, _: "-",
    ">h": lambda e, _: "-",
    "note": lambda e, arg: _dash(e.notes.get(arg or "", "")),
}
# Longest first, so ">Hs" is read before "Hs" and "<st" before "st".
_CODE_NAMES = sorted(CODES, key=len, reverse=True)
# Codes whose values come from the client (or notes): escaped so a field never spans spaces or
# lines. The others are numbers, addresses and Squid words, and the times (%tl) keep their space.
_CLIENT_CODES: Final = frozenset({"rm", "ru", ">ru", "rp", ">rp", "rd", ">rd", "note", "un", "ul"})
_MODIFIERS = re.compile(r"(?P<quote>[\"\['#/])?(?P<left>-)?(?P<zero>0)?(?P<width>[1-9][0-9]*)?"
                        r"(?:\.(?P<precision>[0-9]+))?(?:\{(?P<arg>[^}]*)\})?")  # fmt: skip
_UNKNOWN_CODE = re.compile(r"[<>]?[A-Za-z]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Field:
    code: str
    arg: str | None
    quote: str | None
    left: bool
    zero: bool
    width: int
    precision: int | None


@dataclass(frozen=True, slots=True)
class LogFormat:
    """A parsed format string: literal text and fields, in order."""

    text: str
    parts: tuple[str | _Field, ...]


def parse_logformat(spec: str) -> LogFormat:
    """A named format or a format string; ValueError names every code it cannot write."""
    text = NAMED_FORMATS.get(spec, spec)
    parts: list[str | _Field] = []
    problems: list[str] = []
    literal: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "%":
            literal.append(char)
            index += 1
            continue
        if text.startswith("%%", index):
            literal.append("%")
            index += 2
            continue
        match = _MODIFIERS.match(text, index + 1)
        assert match is not None  # every group is optional
        position = match.end()
        code = next((name for name in _CODE_NAMES if text.startswith(name, position)), None)
        if code is None:
            unknown = _UNKNOWN_CODE.match(text, position)
            shown = unknown.group(0) if unknown else text[position : position + 3]
            problems.append(f"%{shown} (at character {index + 1})")
            index = unknown.end() if unknown else position + 1
            continue
        end = position + len(code)
        arg = match.group("arg")
        if arg is None and text.startswith("{", end):  # Squid also takes the {arg} after
            close = text.find("}", end)
            if close > 0:
                arg = text[end + 1 : close]
                end = close + 1
        if code == "note" and arg not in NOTE_KEYS:
            problems.append(f"%{{{arg}}}note (keys: {', '.join(NOTE_KEYS)})")
        if literal:
            parts.append("".join(literal))
            literal = []
        precision = match.group("precision")
        parts.append(
            _Field(
                code=code,
                arg=arg,
                quote=match.group("quote"),
                left=match.group("left") is not None,
                zero=match.group("zero") is not None,
                width=int(match.group("width") or 0),
                precision=int(precision) if precision is not None else None,
            )
        )
        index = end
    if literal:
        parts.append("".join(literal))
    if problems:
        supported = " ".join(f"%{name}" for name in CODES if name != "note")
        raise ValueError(
            f"unsupported logformat codes: {', '.join(problems)}; supported: {supported}, "
            f"%{{key}}note and the names {', '.join(NAMED_FORMATS)}"
        )
    return LogFormat(text=text, parts=tuple(parts))


def _escape(value: str, quote: str | None) -> str:
    """One field never spans spaces or lines: whitespace, controls, non-ASCII (and, inside
    double quotes, the quote and backslash) are escaped the way Squid escapes them."""
    out: list[str] = []
    for char in value:
        code = ord(char)
        if quote == '"' and char in '"\\':
            out.append("\\" + char)
        elif 0x21 <= code <= 0x7E or (quote == '"' and char == " "):
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
    text = "".join(out)
    return f'"{text}"' if quote == '"' else text


def format_entry(entry: AccessEntry, logformat: LogFormat) -> str:
    """The line for `entry`, without the newline."""
    out: list[str] = []
    for part in logformat.parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value = CODES[part.code](entry, part.arg)
        if part.precision is not None:
            value = value[: part.precision]
        if part.code in _CLIENT_CODES or part.quote == '"':
            value = _escape(value, part.quote)
        if part.width and len(value) < part.width:
            if part.left:
                value = value.ljust(part.width)
            else:
                value = value.rjust(part.width, "0" if part.zero else " ")
        out.append(value)
    return "".join(out)


def squid_line(
    ex: ExchangeLike,
    close_reason: str,
    logformat: LogFormat,
    *,
    end_time: float | None = None,
    now_monotonic: float | None = None,
) -> bytes:
    """The access.log line (with its newline) for a finished exchange."""
    entry = access_entry(
        ex,
        close_reason,
        end_time=time.time() if end_time is None else end_time,
        now_monotonic=time.monotonic() if now_monotonic is None else now_monotonic,
    )
    return format_entry(entry, logformat).encode("ascii", "backslashreplace") + b"\n"
