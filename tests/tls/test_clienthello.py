"""proxy.core.clienthello: what a ClientHello asks for, however it is split, and every malformed
shape refused without reading past what the client declared."""

from __future__ import annotations

import pytest

from proxy.core.clienthello import MAX_CLIENT_HELLO_BYTES, ClientHello, ClientHelloReader
from proxy.errors import Reason, TunnelViolation
from tests.tls.hello import (
    ALPN,
    ECH,
    ESNI,
    alpn_ext,
    client_hello,
    handshake,
    hello_body,
    hello_record,
    real_client_hello,
    records,
    server_name_ext,
    vec,
)


def parse(data: bytes) -> ClientHello | None:
    return ClientHelloReader().feed(data)


def refused(data: bytes) -> TunnelViolation:
    with pytest.raises(TunnelViolation) as info:
        parse(data)
    return info.value


def test_a_real_openssl_hello_gives_its_sni_and_alpn() -> None:
    hello = parse(real_client_hello("api.example.com"))
    assert hello is not None
    assert hello.server_name == "api.example.com"
    assert (hello.ech, hello.esni) == (False, False)
    assert hello.records == 1


def test_a_real_hello_without_sni_has_no_server_name() -> None:
    hello = parse(real_client_hello(None))
    assert hello is not None and hello.server_name is None


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 64])
def test_a_hello_fed_in_pieces_of_any_size_gives_the_same_result(step: int) -> None:
    data = hello_record(b"piece.example", alpn=(b"h2", b"http/1.1"))
    reader = ClientHelloReader()
    results = [reader.feed(data[i : i + step]) for i in range(0, len(data), step)]
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] is not None
    assert results[-1].server_name == "piece.example"
    assert results[-1].alpn == ("h2", "http/1.1")
    assert reader.bytes_seen == len(data)


@pytest.mark.parametrize("sizes", [(1,), (4,), (5, 1), (100,), (1, 1, 1, 1, 1, 1)])
def test_a_hello_split_across_records_is_reassembled(sizes: tuple[int, ...]) -> None:
    hello = parse(records(client_hello(b"split.example"), *sizes))
    assert hello is not None
    assert hello.server_name == "split.example"
    assert hello.records == len(sizes) + 1


def test_a_real_hello_reframed_across_records_and_fed_byte_by_byte() -> None:
    real = real_client_hello("bytes.example")
    message = real[5:]
    data = records(message, 10, 30)
    reader = ClientHelloReader()
    result = None
    for index in range(len(data)):
        result = reader.feed(data[index : index + 1])
        if index < len(data) - 1:
            assert result is None
    assert result is not None and result.server_name == "bytes.example"


def test_bytes_after_the_hello_in_later_records_are_not_parsed() -> None:
    data = hello_record(b"a.example") + b"\x17\x03\x03\x00\x05hello"
    hello = parse(data)
    assert hello is not None and hello.server_name == "a.example"


def test_ech_and_esni_are_reported() -> None:
    hello = parse(records(client_hello(b"public.example", more=[(ECH, b"\x00\x01\x02")])))
    assert hello is not None and hello.ech and hello.encrypted
    hello = parse(records(client_hello(None, more=[(ESNI, b"\x00\x01")])))
    assert hello is not None and hello.esni and hello.server_name is None


def test_a_tls_1_2_hello_without_extensions_has_no_sni() -> None:
    hello = parse(records(handshake(hello_body(extensions=None))))
    assert hello is not None and hello.server_name is None and hello.alpn == ()


MALFORMED = [
    pytest.param(
        records(
            handshake(
                hello_body(
                    extensions=[server_name_ext(b"a.example"), server_name_ext(b"b.example")]
                )
            )
        ),
        id="two-server-name-extensions",
    ),
    pytest.param(
        records(handshake(hello_body(extensions=[server_name_ext(b"a.example", b"b.example")]))),
        id="two-host-names",
    ),
    pytest.param(
        records(handshake(hello_body(extensions=[server_name_ext(b"a.example", name_type=1)]))),
        id="non-host-name-type",
    ),
    pytest.param(
        records(handshake(hello_body(extensions=[server_name_ext(b"")]))), id="empty-name"
    ),
    pytest.param(
        records(
            handshake(hello_body(extensions=[server_name_ext(b"evil.example\x00.good.example")]))
        ),
        id="nul-in-name",
    ),
    pytest.param(
        records(handshake(hello_body(extensions=[server_name_ext(b"caf\xc3\xa9.example")]))),
        id="non-ascii-name",
    ),
    pytest.param(
        records(handshake(hello_body(extensions=[(0, b"")]))), id="empty-server-name-extension"
    ),
    pytest.param(
        records(handshake(hello_body(extensions=[(0, vec(2, b""))]))), id="empty-server-name-list"
    ),
    pytest.param(
        records(handshake(hello_body(extensions=[(0, b"\x00\x10\x00\x00\x05ab")]))),
        id="name-list-length-past-the-extension",
    ),
    pytest.param(
        records(handshake(hello_body(extensions=[(0, vec(2, b"\x00\x00\x20ab"))]))),
        id="name-length-past-the-list",
    ),
    pytest.param(
        records(handshake(hello_body(extensions=[(0, vec(2, b"\x00\x00\x02ab") + b"x")]))),
        id="trailing-bytes-in-the-extension",
    ),
    pytest.param(
        records(handshake(hello_body(raw_extensions=b"\x00\x20\x00\x00"))),
        id="extensions-length-past-the-hello",
    ),
    pytest.param(
        records(handshake(hello_body(raw_extensions=b"\x00\x04\x00\x10\x00\x08"))),
        id="extension-length-past-the-block",
    ),
    pytest.param(
        records(handshake(hello_body(extensions=[]) + b"junk")),
        id="trailing-bytes-after-extensions",
    ),
    pytest.param(
        records(handshake(hello_body(extensions=[alpn_ext(b"h2"), (ALPN, b"\x00\x03\x02h2")]))),
        id="duplicate-extension-type",
    ),
    pytest.param(records(handshake(hello_body(extensions=[alpn_ext(b"")]))), id="empty-alpn-name"),
    pytest.param(records(handshake(hello_body(session_id=b"\x00" * 33))), id="session-id-over-32"),
    pytest.param(records(handshake(hello_body(suites=b"\x13"))), id="odd-cipher-suites"),
    pytest.param(records(handshake(hello_body(compression=b""))), id="no-compression-methods"),
    pytest.param(records(handshake(hello_body(version=0x0200))), id="hello-version-not-tls"),
    pytest.param(records(handshake(b"\x03\x03" + b"\x00" * 10)), id="body-shorter-than-random"),
    pytest.param(records(handshake(hello_body(), msg_type=2)), id="server-hello-type"),
    pytest.param(
        records(client_hello() + handshake(b"", msg_type=11)), id="second-message-in-the-record"
    ),
    pytest.param(b"\x16\x03\x01\x40\x01" + b"\x01" + b"\x00" * 16384, id="record-over-2-14"),
    pytest.param(b"\x16\x03\x01\x00\x00", id="zero-length-record"),
    pytest.param(b"\x16\x03\x09\x00\x05" + b"\x01\x00\x00\x01\x00", id="record-version-not-tls"),
    pytest.param(b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", id="hello-over-the-size-limit"),
    pytest.param(b"\x15\x03\x01\x00\x02\x02\x28", id="alert-before-the-hello"),
    pytest.param(b"\x14\x03\x01\x00\x01\x01", id="change-cipher-spec-before-the-hello"),
    pytest.param(b"\x17\x03\x03\x00\x01x", id="application-data-before-the-hello"),
    pytest.param(b"\x80\x2e\x01\x03\x01" + b"\x00" * 45, id="sslv2-hello"),
    pytest.param(
        records(client_hello()[:50], 20) + b"\x17\x03\x01\x00\x01x",
        id="other-record-type-inside-the-hello",
    ),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_hellos_are_refused(data: bytes) -> None:
    assert refused(data).reason is Reason.CLIENTHELLO_MALFORMED


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_hellos_are_refused_whatever_the_split(data: bytes) -> None:
    reader = ClientHelloReader()
    with pytest.raises(TunnelViolation) as info:
        for index in range(len(data)):
            reader.feed(data[index : index + 1])
    assert info.value.reason is Reason.CLIENTHELLO_MALFORMED
    with pytest.raises(TunnelViolation):
        reader.feed(b"\x16")  # once refused, always refused


def test_an_oversized_hello_is_refused_from_its_header_before_its_body_arrives() -> None:
    length = MAX_CLIENT_HELLO_BYTES  # + 4 header bytes: over the limit
    header = b"\x16\x03\x01\x40\x00" + b"\x01" + length.to_bytes(3, "big")
    assert refused(header).reason is Reason.CLIENTHELLO_MALFORMED


def test_a_hello_at_the_size_limit_spanning_many_records_is_accepted() -> None:
    padding = MAX_CLIENT_HELLO_BYTES - len(client_hello(b"big.example")) - 4
    message = client_hello(b"big.example", more=[(21, b"\x00" * padding)])
    assert len(message) == MAX_CLIENT_HELLO_BYTES
    hello = parse(records(message, *([16384] * 3)))
    assert hello is not None and hello.server_name == "big.example" and hello.records == 4


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh-banner"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="plaintext-http"),
        pytest.param(b"\x00\x00\x00\x08\x04\xd2\x16\x2f", id="postgres-sslrequest"),
        pytest.param(b"\x16\x05", id="tls-content-type-but-not-version-3"),
        pytest.param(b"\x80\x2e\x02", id="high-bit-but-not-sslv2-hello"),
    ],
)
def test_bytes_that_are_not_tls_are_a_protocol_mismatch_from_the_first_bytes(data: bytes) -> None:
    reader = ClientHelloReader()
    with pytest.raises(TunnelViolation) as info:
        for index in range(len(data)):
            reader.feed(data[index : index + 1])
    assert info.value.reason is Reason.PROTOCOL_MISMATCH
    assert reader.bytes_seen <= 3
