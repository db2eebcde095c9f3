"""The PROXY protocol parser (proxy.core.proxy_protocol): bytes in, a header or an error out."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from proxy.core.proxy_protocol import (
    MAX_V2_PAYLOAD,
    V2_SIGNATURE,
    Command,
    ProxyHeader,
    parse_proxy_header,
    starts_like_proxy_header,
)
from proxy.errors import BadRequest, Reason

REQUEST = b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n"


def v2(
    command: int = 1, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"", version=2
) -> bytes:
    payload = addresses + tlvs
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family])
        + struct.pack("!H", len(payload))
        + payload
    )


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.ip_address(src).packed
        + ipaddress.ip_address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


V1_TCP4 = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 3128\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 3128\r\n"
V2_TCP4 = v2(addresses=inet("192.0.2.7", "10.0.0.1", 51000, 3128))
V2_TCP6 = v2(family=0x21, addresses=inet("2001:db8::7", "2001:db8::1", 51000, 3128))
# AWS NLB sends its VPC endpoint id as TLV 0xEA; HAProxy may send ALPN (0x01) and a CRC (0x03).
V2_TLVS = v2(
    addresses=inet("192.0.2.7", "10.0.0.1", 51000, 3128),
    tlvs=tlv(0xEA, b"\x01vpce-0123456789abcdef") + tlv(0x01, b"h2") + tlv(0x04, b""),
)


@pytest.mark.parametrize(
    ("data", "version", "command", "source"),
    [
        (V1_TCP4, 1, Command.PROXY, ("192.0.2.7", 51000)),
        (V1_TCP6, 1, Command.PROXY, ("2001:db8::7", 51000)),
        (b"PROXY UNKNOWN\r\n", 1, Command.PROXY, None),
        (b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n", 1, Command.PROXY, None),
        (V2_TCP4, 2, Command.PROXY, ("192.0.2.7", 51000)),
        (V2_TCP6, 2, Command.PROXY, ("2001:db8::7", 51000)),
        (V2_TLVS, 2, Command.PROXY, ("192.0.2.7", 51000)),
        # LOCAL: a health check from the balancer; whatever follows is ignored.
        (v2(command=0, family=0x00), 2, Command.LOCAL, None),
        (v2(command=0, family=0x11, addresses=b"junk"), 2, Command.LOCAL, None),
        # AF_UNSPEC with PROXY: no address, the peer is the source.
        (v2(family=0x00), 2, Command.PROXY, None),
    ],
)
def test_well_formed_headers_are_read_and_leave_the_request(
    data: bytes, version: int, command: Command, source: tuple[str, int] | None
) -> None:
    header = parse_proxy_header(data + REQUEST)
    assert isinstance(header, ProxyHeader)
    assert (header.version, header.command, header.length) == (version, command, len(data))
    if source is None:
        assert header.source is None
    else:
        assert header.source == (ipaddress.ip_address(source[0]), source[1])


@pytest.mark.parametrize(
    "data",
    [V1_TCP4, V1_TCP6, V2_TCP4, V2_TCP6, V2_TLVS],
)
def test_every_cut_of_a_header_asks_for_more(data: bytes) -> None:
    for cut in range(len(data)):
        assert parse_proxy_header(data[:cut]) is None, cut


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET http://a.test/ HTTP/1.1\r\n\r\n", "does not start with one"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "PROXY TCP4|TCP6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "PROXY TCP4|TCP6"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "dotted-quad"),
        (b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n", "dotted-quad"),
        (b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n", "IPv6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "PROXY TCP4|TCP6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
        (b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 2\r\n", "ASCII"),
        (b"PROXY " + b"A" * 101 + b"\r\n", "longer than 107"),
        (v2(version=1), "version 1"),
        (v2(command=2), "neither LOCAL nor PROXY"),
        (v2(family=0x12, addresses=bytes(12)), "STREAM"),
        (v2(family=0x31, addresses=bytes(216)), "INET and INET6"),
        (v2(family=0x11, addresses=bytes(11)), "needs 12"),
        (v2(family=0x21, addresses=bytes(35)), "needs 36"),
        (v2(addresses=inet("192.0.2.7", "10.0.0.1", 1, 2), tlvs=b"\x01\x00"), "cut short"),
        (v2(addresses=inet("192.0.2.7", "10.0.0.1", 1, 2), tlvs=b"\x01\x00\x09ab"), "longer"),
        (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_PAYLOAD + 1), "announces"),
    ],
)
def test_malformed_headers_are_refused_with_the_reason(data: bytes, why: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_proxy_header(data)
    assert caught.value.reason is Reason.PROXY_PROTOCOL_INVALID
    assert caught.value.status == 400
    assert why in caught.value.message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"P", True),
        (b"PROXY TCP4", True),
        (b"\r\n\r\n\x00", True),
        (V2_TCP4, True),
        (b"\r\n\r\nX", False),
        (b"CONNECT", False),
        (b"PRIX", False),
    ],
)
def test_what_starts_like_a_header(data: bytes, expected: bool) -> None:
    assert starts_like_proxy_header(data) is expected
