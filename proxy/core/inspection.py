"""Requests inside a tunnel (intercepted TLS, or an `http` tunnel): parse, check, render.

Pure. The tunnel already fixes where bytes go (the CONNECT host and the address the guard
approved); what is checked here is that each request inside agrees with it and with the rule:

  1. Parse with the core parser (proxy.core.http1) in its ORIGIN form, so framing is as strict
     as for forwarded requests. Origin-form targets (`GET /x`), the normal form inside a
     tunnel, go to the CONNECT authority; absolute-form (`GET https://host/x`) is accepted too
     (RFC 9112 section 3.2.2: a server MUST accept it), and CONNECT is a 400.
  2. Host (and an absolute-form authority) must name the CONNECT host: 421 otherwise
     (RFC 9110 section 15.5.20). An explicit port must be the CONNECT port; an omitted one is
     accepted, since the connection's port is fixed whatever the field says.
  3. The rule's `methods` (exact, case-sensitive) and `paths` (exact, or a prefix before a
     trailing `*`). Paths that could be read two ways by the origin - dot segments, encoded
     slashes, dots or backslashes - are refused when `paths` restricts, so `/v2/../admin`
     cannot pass as `/v2/*`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.core.hosts import Host, split_authority
from proxy.core.http1 import (
    DEFAULT_PORTS,
    RequestForm,
    RequestHead,
    parse_request_head,
    render_request_head,
    target_authority,
)
from proxy.core.policy.model import Inspect
from proxy.errors import MisdirectedRequest, PolicyDenied, Reason

# Dot segments and the encodings an origin may decode into a path separator or a dot.
_AMBIGUOUS_PATH = re.compile(r"(?:^|/)\.\.?(?:/|$)|%2[eEfF]|%5[cC]|\\")


@dataclass(frozen=True, slots=True, kw_only=True)
class InnerRequest:
    head: RequestHead  # host/port are the CONNECT authority's, whatever the client named
    host_field: str | None  # the client's Host value; sent upstream as it is once checked
    # An absolute-form target's own authority (port 0 when it gave none), checked against the
    # CONNECT host by `check_authority`.
    target: tuple[Host, int] | None = None


def parse_inner_request(head: bytes, *, connect: Host, port: int) -> InnerRequest:
    """Parse one request head read inside a tunnel to `connect`:`port`.

    Raises BadRequest (400) or the parser's 414/431/505. Whether the request names the CONNECT
    host is `check_authority`'s question, asked once the framing is known (a 421 keeps a
    connection whose request had no body).
    """
    req = parse_request_head(head, form=RequestForm.ORIGIN, authority=(connect, port))
    return InnerRequest(head=req, host_field=req.header("host"), target=target_authority(req))


def check_authority(inner: InnerRequest, *, connect: Host, port: int) -> None:
    """The target's authority and the Host field must name `connect` (an explicit port must be
    `port`); MisdirectedRequest (421) otherwise."""
    if inner.target is not None:
        target_host, target_port = inner.target
        if target_host.name != connect.name or target_port not in (0, port):
            raise MisdirectedRequest(
                f"request for {target_host.name} inside a tunnel to {connect.name}:{port}"
            )
    if inner.host_field is not None:
        field_host, field_port = split_authority(inner.host_field, default_port=0)
        if field_host.name != connect.name or field_port not in (0, port):
            raise MisdirectedRequest(
                f"Host {inner.host_field[:64]!r} inside a tunnel to {connect.name}:{port}"
            )


def request_line_hint(head: bytes) -> tuple[str | None, str | None]:
    """Method and target as sent, for the audit record of a request refused before it parsed
    (raw client strings: the audit record escapes and truncates them)."""
    line = head.lstrip(b"\r\n").split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3:
        return None, None
    return parts[0].decode("latin-1"), parts[1].decode("latin-1")


def sent_fields(head: bytes) -> tuple[str | None, str | None, str | None, str | None]:
    """Method, target, Host and User-Agent as a client sent them, read leniently from a head
    that may not parse: shown on the admin page for a refused request (which escapes them)."""
    method, target = request_line_hint(head)
    host = agent = None
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        lowered = name.strip().lower()
        if lowered == b"host" and host is None:
            host = value.strip().decode("latin-1")
        elif lowered == b"user-agent" and agent is None:
            agent = value.strip().decode("latin-1")
    return method, target, host, agent


def render_inner_request(inner: InnerRequest, *, scheme: str) -> bytes:
    """The request for the upstream: the core rendering (hop-by-hop and proxy fields dropped,
    framing re-rendered), with the client's own Host value, which it may have signed (AWS
    SigV4 signs Host) and which was checked to name the CONNECT host."""
    req = inner.head
    rendered = render_request_head(req)
    line_end = rendered.index(b"\r\n") + 2
    host_end = rendered.index(b"\r\n", line_end) + 2
    if not rendered.startswith(b"Host: ", line_end):  # render_request_head's documented order
        raise ValueError("rendered request does not start with Host")
    if inner.host_field is not None:
        host = inner.host_field.encode("latin-1")
    else:
        name = (
            f"[{req.host.name}]"
            if req.host.ip is not None and req.host.ip.version == 6
            else req.host.name
        )
        default = DEFAULT_PORTS.get(scheme)
        host = (name if req.port == default else f"{name}:{req.port}").encode("ascii")
    return rendered[:line_end] + b"Host: " + host + b"\r\n" + rendered[host_end:]


def check_inspect(req: RequestHead, inspect: Inspect) -> None:
    """The rule's `methods` and `paths`; raises PolicyDenied (403) with the reason."""
    if inspect.methods and req.method not in inspect.methods:
        raise PolicyDenied(
            f"method {req.method} is not allowed by this rule", reason=Reason.METHOD_NOT_ALLOWED
        )
    if inspect.paths:
        path = req.path.partition("?")[0]
        if _AMBIGUOUS_PATH.search(path):
            raise PolicyDenied(
                "path has dot segments or encoded separators", reason=Reason.PATH_NOT_ALLOWED
            )
        if not any(path_matches(path, pattern) for pattern in inspect.paths):
            raise PolicyDenied(
                f"path {path[:128]} is not allowed by this rule", reason=Reason.PATH_NOT_ALLOWED
            )


def path_matches(path: str, pattern: str) -> bool:
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    return path == pattern
