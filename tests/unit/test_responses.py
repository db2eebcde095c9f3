"""The one refusal renderer: every refusal's status line carries its reason (issue 14, defect 3)."""

from __future__ import annotations

import re

import pytest

from proxy.dataplane.responses import render_error
from proxy.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    HeadersTooLarge,
    HeaderTimeout,
    MisdirectedRequest,
    OutgateError,
    PolicyDenied,
    Reason,
    ServiceUnavailable,
    TooManyRequests,
    UriTooLong,
    VersionNotSupported,
)

# RFC 9112 section 4: status-line = HTTP-version SP status-code SP [ reason-phrase ];
# reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ).
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) ([\t\x20-\x7e\x80-\xff]+)")

REFUSALS: list[tuple[OutgateError, str]] = [
    (PolicyDenied("denied by policy"), "Forbidden by egress policy: rule_deny"),
    (
        PolicyDenied("no address left", reason=Reason.GUARDED_ADDRESS),
        "Forbidden by egress policy: guarded_address",
    ),
    (
        BadRequest("https:// targets", reason=Reason.UNSUPPORTED_SCHEME),
        "Bad Request (egress proxy): unsupported_scheme",
    ),
    (HeaderTimeout("slow"), "Request Timeout (egress proxy): header_timeout"),
    (UriTooLong("long"), "Request-URI Too Long (egress proxy): uri_too_long"),
    (MisdirectedRequest("other host"), "Misdirected Request (egress proxy): misdirected_request"),
    (TooManyRequests("cap"), "Too Many Requests (egress proxy): connection_limit"),
    (HeadersTooLarge("big"), "Request Header Fields Too Large (egress proxy): headers_too_large"),
    (
        BadGateway("nx", reason=Reason.DNS_NXDOMAIN),
        "Bad Gateway (egress proxy): dns_nxdomain",
    ),
    (ServiceUnavailable("starting"), "Service Unavailable (egress proxy): not_ready"),
    (GatewayTimeout("slow upstream"), "Gateway Timeout (egress proxy): upstream_timeout"),
    (
        VersionNotSupported("HTTP/2.0"),
        "HTTP Version Not Supported (egress proxy): unsupported_version",
    ),
]


@pytest.mark.parametrize(("error", "phrase"), REFUSALS, ids=[type(e).__name__ for e, _ in REFUSALS])
def test_every_refusal_status_line_carries_the_reason_within_the_reason_phrase_grammar(
    error: OutgateError, phrase: str
) -> None:
    reply = render_error(
        error, event_id="e1", workload="tests/client", destination="x:1", keep_alive=False
    )
    status_line = reply.split(b"\r\n", 1)[0]
    match = STATUS_LINE.fullmatch(status_line)
    assert match is not None, status_line
    assert int(match.group(1)) == error.status
    assert match.group(2).decode() == phrase
    # The header and the body keep saying it too.
    assert f"\r\nX-Outgate-Reason: {error.reason}\r\n".encode() in reply
    assert f"\nreason: {error.reason}\n".encode() in reply
