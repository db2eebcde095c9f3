"""Request smuggling and header tricks: every ambiguous framing is a 400 and a close, and the
upstream never sees a request it could read differently from the proxy."""

from __future__ import annotations

import pytest

from tests.security.conftest import Range

POST = "POST http://{o}/echo HTTP/1.1\r\nHost: {o}\r\n"
GET = "GET http://{o}/hello HTTP/1.1\r\nHost: {o}\r\n"

# (id, raw request, reason in X-Outgate-Reason)
CASES = [
    (
        "cl-te",
        POST + "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        "ambiguous_framing",
    ),
    (
        "te-cl",
        POST + "Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nG",
        "ambiguous_framing",
    ),
    (
        "te-space-before-colon",
        POST + "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        "malformed_request",
    ),
    ("te-xchunked", POST + "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", "ambiguous_framing"),
    (
        "te-tab-with-cl",
        POST + "Transfer-Encoding:\tchunked\r\nContent-Length: 3\r\n\r\nabc",
        "ambiguous_framing",
    ),
    (
        "te-twice",
        POST + "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        "ambiguous_framing",
    ),
    (
        "te-chunked-chunked",
        POST + "Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        "ambiguous_framing",
    ),
    (
        "te-in-http-1.0",
        "POST http://{o}/echo HTTP/1.0\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "ambiguous_framing",
    ),
    (
        "cl-differing",
        POST + "Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "ambiguous_framing",
    ),
    ("cl-plus", POST + "Content-Length: +3\r\n\r\nabc", "ambiguous_framing"),
    ("cl-hex", POST + "Content-Length: 0x3\r\n\r\nabc", "ambiguous_framing"),
    ("cl-negative", POST + "Content-Length: -1\r\n\r\n", "ambiguous_framing"),
    (
        "obs-fold-hides-te",
        POST + "X-A: b\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "malformed_request",
    ),
    (
        "bare-lf-between-fields",
        GET + "X-A: b\nTransfer-Encoding: chunked\r\n\r\n",
        "malformed_request",
    ),
    ("nul-in-name", GET + "X-\x00A: b\r\n\r\n", "malformed_request"),
    ("non-token-name", GET + "X[1]: b\r\n\r\n", "malformed_request"),
    (
        "two-spaces-in-request-line",
        "GET  http://{o}/hello HTTP/1.1\r\nHost: {o}\r\n\r\n",
        "malformed_request",
    ),
    (
        "huge-chunk-size",
        POST + "Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\nx\r\n",
        "bad_chunk",
    ),
    (
        "negative-chunk-size",
        POST + "Transfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n",
        "bad_chunk",
    ),
    (
        "chunk-missing-crlf",
        POST + "Transfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n",
        "bad_chunk",
    ),
    ("two-host-headers", GET + "Host: evil.test\r\n\r\n", "malformed_request"),
]


@pytest.mark.parametrize(("raw", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_ambiguous_request_is_refused_closed_and_never_reaches_the_upstream(
    attack_range: Range, raw: str, reason: str
) -> None:
    attack = attack_range.send(raw.format(o=attack_range.origin_authority).encode("latin-1"))
    assert attack.status == 400, attack.data[:200]
    assert attack.header("X-Outgate-Reason") == reason
    assert attack.closed
    assert attack_range.close_reason(attack) == reason
    assert attack_range.origin.seen == []
    attack_range.nothing_reached_forbidden()


def test_a_request_inside_a_body_is_body_not_a_second_request(attack_range: Range) -> None:
    smuggled = (
        f"GET http://{attack_range.origin_authority}/hello HTTP/1.1\r\n"
        f"Host: {attack_range.origin_authority}\r\n\r\n"
    )
    raw = (
        POST.format(o=attack_range.origin_authority)
        + f"Content-Length: {len(smuggled)}\r\n\r\n"
        + smuggled
    )
    attack = attack_range.send(raw.encode(), half_close=True)
    assert attack.status == 200
    assert attack.data.endswith(smuggled.encode())  # echoed back as the body it was
    assert attack_range.origin.paths_seen() == ["/echo"]
    assert len(attack_range.records(attack, "decision")) == 1
