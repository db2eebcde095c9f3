"""proxy.core.inspection: a request inside a tunnel must name the tunnel's host (421 otherwise),
keep to the rule's methods and paths (403), and reach the upstream without proxy headers."""

from __future__ import annotations

import pytest

from proxy.core.hosts import parse_host
from proxy.core.http1 import MAX_TARGET_BYTES
from proxy.core.inspection import (
    InnerRequest,
    check_authority,
    check_inspect,
    parse_inner_request,
    render_inner_request,
)
from proxy.core.policy.model import Inspect
from proxy.errors import (
    BadRequest,
    MisdirectedRequest,
    OutgateError,
    PolicyDenied,
    Reason,
    UriTooLong,
)

CONNECT = parse_host("api.example.com")


def parse(head: bytes, connect: str = "api.example.com", port: int = 443) -> InnerRequest:
    inner = parse_inner_request(head, connect=parse_host(connect), port=port)
    check_authority(inner, connect=parse_host(connect), port=port)
    return inner


ACCEPTED = [
    b"GET /v2/items?x=1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: API.Example.com.\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n",
    b"GET https://api.example.com/v2 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET https://api.example.com:443/v2 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET http://api.example.com/v2 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",  # port omitted
    b"\r\nGET /v2 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
]


@pytest.mark.parametrize("head", ACCEPTED)
def test_requests_naming_the_connect_host_are_accepted(head: bytes) -> None:
    inner = parse(head)
    assert inner.head.host.name == "api.example.com"
    assert inner.head.port == 443


MISDIRECTED = [
    b"GET / HTTP/1.1\r\nHost: other.example.com\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.example.com:8443\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.example.com.evil.example\r\n\r\n",
    b"GET https://other.example.com/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET http://api.example.com:80/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET https://api.example.com/ HTTP/1.1\r\nHost: other.example.com\r\n\r\n",
]


@pytest.mark.parametrize("head", MISDIRECTED)
def test_requests_for_another_host_are_misdirected(head: bytes) -> None:
    with pytest.raises(MisdirectedRequest) as info:
        parse(head)
    assert info.value.status == 421 and info.value.reason is Reason.MISDIRECTED_REQUEST


BAD = [
    b"CONNECT other.example.com:443 HTTP/1.1\r\nHost: other.example.com\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET ftp://api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # 1.1 without Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: api.example.com\r\n"
    b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /\x01 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"CONNECT / HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET api.example.com:443 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET https:///x HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
]


@pytest.mark.parametrize("head", BAD)
def test_malformed_or_ambiguous_requests_are_refused_by_the_core_parser(head: bytes) -> None:
    with pytest.raises(OutgateError) as info:
        parse(head)
    assert info.value.status == 400


def test_a_target_of_the_full_limit_is_accepted_as_the_client_sent_it() -> None:
    target = b"/" + b"a" * (MAX_TARGET_BYTES - 1)
    inner = parse(b"GET " + target + b" HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    assert inner.head.path.encode() == target
    with pytest.raises(UriTooLong):
        parse(b"GET " + target + b"a HTTP/1.1\r\nHost: api.example.com\r\n\r\n")


def test_the_upstream_gets_the_clients_host_and_no_proxy_or_hop_by_hop_headers() -> None:
    inner = parse(
        b"POST /v2/x HTTP/1.1\r\nHost: API.example.com\r\nProxy-Authorization: Basic c2VjcmV0\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Authorization: AWS4-HMAC-SHA256 Credential=x\r\nContent-Length: 3\r\n\r\n"
    )
    rendered = render_inner_request(inner, scheme="https")
    assert rendered == (
        b"POST /v2/x HTTP/1.1\r\nHost: API.example.com\r\n"
        b"Authorization: AWS4-HMAC-SHA256 Credential=x\r\nContent-Length: 3\r\n\r\n"
    )


def test_an_http_1_0_request_without_host_gets_the_connect_authority() -> None:
    inner = parse(b"GET / HTTP/1.0\r\n\r\n")
    assert render_inner_request(inner, scheme="https").startswith(
        b"GET / HTTP/1.1\r\nHost: api.example.com\r\n"
    )
    inner = parse(b"GET / HTTP/1.0\r\n\r\n", port=8443)
    assert b"Host: api.example.com:8443\r\n" in render_inner_request(inner, scheme="https")


RULE = Inspect(methods=("GET", "POST"), paths=("/v2/*", "/health"))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"GET /v2/items", None),
        (b"POST /v2/", None),
        (b"GET /health", None),
        (b"GET /health?full=1", None),
        (b"DELETE /v2/items", Reason.METHOD_NOT_ALLOWED),
        (b"get /v2/items", Reason.METHOD_NOT_ALLOWED),
        (b"GET /v1/items", Reason.PATH_NOT_ALLOWED),
        (b"GET /v2", Reason.PATH_NOT_ALLOWED),
        (b"GET /healthz", Reason.PATH_NOT_ALLOWED),
        (b"GET /v2/../admin", Reason.PATH_NOT_ALLOWED),
        (b"GET /v2/%2e%2e/admin", Reason.PATH_NOT_ALLOWED),
        (b"GET /v2/..%2Fadmin", Reason.PATH_NOT_ALLOWED),
        (b"GET /v2/.%2E/admin", Reason.PATH_NOT_ALLOWED),
        (b"GET /v2/a\\..\\admin", Reason.PATH_NOT_ALLOWED),  # some origins read \\ as /
    ],
)
def test_methods_and_paths_of_the_rule(line: bytes, reason: Reason | None) -> None:
    try:
        req = parse(line + b" HTTP/1.1\r\nHost: api.example.com\r\n\r\n").head
    except BadRequest as exc:
        assert reason is exc.reason
        return
    if reason is None:
        check_inspect(req, RULE)
        return
    with pytest.raises(PolicyDenied) as info:
        check_inspect(req, RULE)
    assert info.value.reason is reason and info.value.status == 403


def test_an_empty_inspect_allows_every_method_and_path() -> None:
    req = parse(b"PURGE /anything/../x HTTP/1.1\r\nHost: api.example.com\r\n\r\n").head
    check_inspect(req, Inspect())
    assert CONNECT.name == "api.example.com"
