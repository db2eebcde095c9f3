"""The one place an error becomes bytes on the wire (DESIGN section 6)."""

from __future__ import annotations

import functools
from http import HTTPStatus

from proxy.errors import OutgateError, Overloaded, ProxyAuthRequired, TooManyRequests

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
# Seconds a client should wait after a 429 or a 503 `overloaded` before trying again.
RETRY_AFTER_SECONDS = 1


def _safe(text: str, limit: int = 256) -> str:
    """Keep a reply to one line of printable ASCII: client text is echoed back here."""
    if text.isascii() and text.isprintable():  # the usual case, checked in C: 32..126 only
        return text[:limit]
    cleaned = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return cleaned[:limit]


def reason_phrase(error: OutgateError) -> str:
    """The status line's reason phrase, carrying the reason code: many clients print only the
    status line, never the body or `X-Outgate-Reason` (Go's net/http for every refusal, Python's
    urllib3 for a refused CONNECT, curl's `-i` for a plain one). A policy refusal reads
    `Forbidden by egress policy: rule_deny`; any other `<standard phrase> (egress proxy): <reason>`.
    Both stay within RFC 9112 section 4's reason-phrase = 1*( HTAB / SP / VCHAR / obs-text )."""
    origin = "by egress policy" if error.status == HTTPStatus.FORBIDDEN else "(egress proxy)"
    return _safe(f"{_standard_phrase(error.status)} {origin}: {error.reason}")


@functools.cache
def _standard_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def render_error(
    error: OutgateError,
    *,
    event_id: str,
    workload: str,
    destination: str,
    keep_alive: bool,
) -> bytes:
    """Status line, `X-Outgate-Reason`, and a short text body a person can act on."""
    phrase = _standard_phrase(error.status)
    body = (
        f"Outgate refused this request: {_safe(error.message)}\n"
        f"status: {error.status} {phrase}\n"
        f"reason: {error.reason}\n"
        f"workload: {_safe(workload)}\n"
        f"destination: {_safe(destination)}\n"
        f"event id: {event_id}\n"
    ).encode("ascii")
    headers = [
        f"HTTP/1.1 {error.status} {reason_phrase(error)}",
        "Content-Type: text/plain; charset=us-ascii",
        f"Content-Length: {len(body)}",
        f"X-Outgate-Reason: {error.reason}",
        f"X-Outgate-Event-Id: {event_id}",
        "Cache-Control: no-store",
    ]
    if isinstance(error, (TooManyRequests, Overloaded)):
        headers.append(f"Retry-After: {RETRY_AFTER_SECONDS}")
    if isinstance(error, ProxyAuthRequired):
        headers.append(f"Proxy-Authenticate: {error.challenge}")
    headers.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + body
