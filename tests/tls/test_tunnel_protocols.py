"""proxy.core.tunnel_protocols: first-bytes checks per protocol, and the SNI rules, as tables."""

from __future__ import annotations

import struct

import pytest

from proxy.core.clienthello import ClientHello
from proxy.core.hosts import parse_host
from proxy.core.policy.model import EchMode, SniMode, TlsOptions, TunnelProtocol
from proxy.core.tunnel_protocols import (
    SniOutcome,
    TlsOrHttpCheck,
    check_server_name,
    first_bytes_check,
    starts_http_request,
)
from proxy.errors import Reason, TunnelViolation
from tests.tls.hello import hello_record


def startup(**params: str) -> bytes:
    body = (
        struct.pack(">I", 196608)
        + b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items())
        + b"\x00"
    )
    return struct.pack(">I", len(body) + 4) + body


SSL_REQUEST = struct.pack(">II", 8, 80877103)
GSSENC_REQUEST = struct.pack(">II", 8, 80877104)
CANCEL_REQUEST = struct.pack(">IIII", 16, 80877102, 1234, 5678)

ACCEPTED = [
    (TunnelProtocol.TLS, hello_record(b"a.example")),
    (TunnelProtocol.POSTGRES, SSL_REQUEST),
    (TunnelProtocol.POSTGRES, GSSENC_REQUEST),
    (TunnelProtocol.POSTGRES, CANCEL_REQUEST),
    (TunnelProtocol.POSTGRES, startup(user="app", database="ledger")),
    (TunnelProtocol.SSH, b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3\r\n"),
    (TunnelProtocol.SSH, b"SSH-2.0-paramiko_3.4\n"),
    (TunnelProtocol.HTTP, b"GET / HTTP/1.1\r\n"),
    (TunnelProtocol.HTTP, b"\r\nPOST /x HTTP/1.1\r\n"),
    (TunnelProtocol.TCP, b"\x00anything"),
    # A rule without protocol: TLS or plain HTTP.
    (None, hello_record(b"a.example")),
    (None, b"GET / HTTP/1.1\r\n"),
    (None, b"\r\nPOST /x HTTP/1.1\r\n"),
]


@pytest.mark.parametrize(("protocol", "data"), ACCEPTED)
def test_the_right_first_bytes_are_accepted_whole_or_byte_by_byte(
    protocol: TunnelProtocol | None, data: bytes
) -> None:
    assert first_bytes_check(protocol).feed(data)
    check = first_bytes_check(protocol)
    results = [check.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[-1] is True


REFUSED = [
    (TunnelProtocol.TLS, b"SSH-2.0-x\r\n"),
    (TunnelProtocol.TLS, b"GET / HTTP/1.1\r\n"),
    (TunnelProtocol.POSTGRES, b"GET / HTTP/1.1\r\n"),
    (TunnelProtocol.POSTGRES, hello_record(b"a.example")),
    (TunnelProtocol.POSTGRES, struct.pack(">II", 9, 80877103) + b"x"),
    (TunnelProtocol.POSTGRES, struct.pack(">II", 8, 131072)),  # protocol 2
    (TunnelProtocol.POSTGRES, struct.pack(">II", 20000, 196608)),
    (TunnelProtocol.POSTGRES, startup(database="ledger")),  # no user
    (TunnelProtocol.POSTGRES, struct.pack(">II", 12, 196608) + b"user"),  # not NUL-terminated
    (TunnelProtocol.SSH, b"SSH-1.5-old\r\n"),
    (TunnelProtocol.SSH, b"GET / HTTP/1.1\r\n"),
    (TunnelProtocol.SSH, b"SSH-2.0-\r\n"),
    (TunnelProtocol.SSH, b"SSH-2.0-" + b"x" * 300),
    (TunnelProtocol.SSH, b"SSH-2.0-ok\x01\r\n"),
    (TunnelProtocol.HTTP, hello_record(b"a.example")),
    (TunnelProtocol.HTTP, b"SSH-2.0-x\r\n"),
    (TunnelProtocol.HTTP, b" GET / HTTP/1.1\r\n"),
    (TunnelProtocol.HTTP, b"G" * 40),
    (TunnelProtocol.HTTP, b"\r\n" * 5 + b"GET / HTTP/1.1\r\n"),
    (None, b"SSH-2.0-OpenSSH_9.6\r\n"),
    (None, b"\x15\x03\x01\x00\x02\x02\x28"),  # a TLS alert is no ClientHello
    (None, startup(user="app")),
    (None, b" GET / HTTP/1.1\r\n"),
]


@pytest.mark.parametrize(("protocol", "data"), REFUSED)
def test_other_first_bytes_are_a_protocol_mismatch(
    protocol: TunnelProtocol | None, data: bytes
) -> None:
    check = first_bytes_check(protocol)
    with pytest.raises(TunnelViolation) as info:
        for i in range(len(data)):
            check.feed(data[i : i + 1])
    assert info.value.reason in (Reason.PROTOCOL_MISMATCH, Reason.CLIENTHELLO_MALFORMED)


def test_without_protocol_the_check_says_whether_the_bytes_were_tls() -> None:
    tls = TlsOrHttpCheck()
    assert tls.feed(hello_record(b"a.example"))
    assert tls.hello is not None and tls.hello.server_name == "a.example"
    http = TlsOrHttpCheck()
    assert http.feed(b"GET /ws HTTP/1.1\r\n")
    assert http.hello is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"\r\nDELETE /x HTTP/1.1\r\n", True),
        (b"GE", False),  # not yet a method and a space
        (b"SSH-2.0-x\r\n", False),
        (hello_record(b"a.example"), False),
        (b"", False),
    ],
)
def test_starts_http_request(data: bytes, expected: bool) -> None:
    assert starts_http_request(data) is expected


def test_a_partial_postgres_startup_waits_for_the_rest() -> None:
    data = startup(user="app")
    check = first_bytes_check(TunnelProtocol.POSTGRES)
    assert check.feed(data[:-3]) is False
    assert check.feed(data[-3:]) is True


def hello(name: str | None, *, ech: bool = False, esni: bool = False) -> ClientHello:
    return ClientHello(
        server_name=name, alpn=(), ech=ech, esni=esni, legacy_version=0x0303, size=0, records=1
    )


REQUIRED = TlsOptions()
OPTIONAL = TlsOptions(sni=SniMode.OPTIONAL)
ECH_DENY = TlsOptions(ech=EchMode.DENY)

SNI_TABLE = [
    # (sni, connect, options, outcome or refusal reason)
    ("api.example.com", "api.example.com", REQUIRED, SniOutcome.MATCHES),
    ("API.Example.COM.", "api.example.com", REQUIRED, SniOutcome.MATCHES),
    # Non-ASCII never gets here (the ClientHello parser refuses it); names compare normalised.
    ("bücher.example", "xn--bcher-kva.example", REQUIRED, SniOutcome.MATCHES),
    ("xn--bcher-kva.example", "bücher.example", REQUIRED, SniOutcome.MATCHES),
    ("other.example.com", "api.example.com", REQUIRED, Reason.SNI_MISMATCH),
    ("other.example.com", "api.example.com", OPTIONAL, Reason.SNI_MISMATCH),
    ("example.com", "api.example.com", REQUIRED, Reason.SNI_MISMATCH),
    (None, "api.example.com", REQUIRED, Reason.SNI_MISSING),
    (None, "api.example.com", OPTIONAL, SniOutcome.ABSENT),
    ("203.0.113.7", "api.example.com", REQUIRED, Reason.SNI_IP_LITERAL),
    ("203.0.113.7", "api.example.com", OPTIONAL, Reason.SNI_IP_LITERAL),
    ("2130706433", "api.example.com", REQUIRED, Reason.SNI_IP_LITERAL),
    ("0x7f.1", "api.example.com", REQUIRED, Reason.SNI_IP_LITERAL),
    ("[2001:db8::1]", "api.example.com", REQUIRED, Reason.SNI_IP_LITERAL),
    ("203.0.113.7", "203.0.113.7", REQUIRED, Reason.SNI_IP_LITERAL),
    (None, "203.0.113.7", REQUIRED, SniOutcome.ABSENT),
    ("db.example.com", "203.0.113.7", REQUIRED, SniOutcome.CHECK_POLICY),
    ("bad_name!", "api.example.com", REQUIRED, Reason.CLIENTHELLO_MALFORMED),
]


@pytest.mark.parametrize(("sni", "connect", "options", "expected"), SNI_TABLE)
def test_sni_rules(
    sni: str | None, connect: str, options: TlsOptions, expected: SniOutcome | Reason
) -> None:
    connect_host = parse_host(connect)
    if isinstance(expected, SniOutcome):
        verdict = check_server_name(hello(sni), connect=connect_host, tls=options)
        assert verdict.outcome is expected
    else:
        with pytest.raises(TunnelViolation) as info:
            check_server_name(hello(sni), connect=connect_host, tls=options)
        assert info.value.reason is expected


def test_ech_is_allowed_by_default_with_the_outer_sni_still_checked() -> None:
    connect = parse_host("api.example.com")
    verdict = check_server_name(hello("api.example.com", ech=True), connect=connect, tls=REQUIRED)
    assert verdict.outcome is SniOutcome.MATCHES
    with pytest.raises(TunnelViolation) as info:
        check_server_name(hello("public.example", ech=True), connect=connect, tls=REQUIRED)
    assert info.value.reason is Reason.SNI_MISMATCH


@pytest.mark.parametrize("kind", ["ech", "esni"])
def test_ech_deny_refuses_ech_and_esni(kind: str) -> None:
    offered = hello("api.example.com", ech=kind == "ech", esni=kind == "esni")
    with pytest.raises(TunnelViolation) as info:
        check_server_name(offered, connect=parse_host("api.example.com"), tls=ECH_DENY)
    assert info.value.reason is Reason.ECH_DENIED
