"""The PROXY protocol header a load balancer puts before a client's bytes (versions 1 and 2).

Sans-I/O, as h11 is: `parse_proxy_header(data)` takes the bytes received so far and answers
`None` (need more), a `ProxyHeader` (with how many bytes it used), or raises BadRequest
(reason proxy_protocol_invalid). The listener decides who may send one (proxy.dataplane.
proxy_header); this module only reads it. The specification is HAProxy's "The PROXY protocol,
versions 1 & 2" (doc/proxy-protocol.txt); section numbers below are that document's.

Rules (section 2.1 for v1, 2.2 for v2):
  1. v1 is one ASCII line `PROXY TCP4|TCP6|UNKNOWN src dst sport dport\\r\\n` of at most 107
     bytes. Addresses are canonical (TCP4 dotted quad, TCP6 an IPv6 text form), ports 0..65535
     without leading zeros. `UNKNOWN` carries no usable address: the connection's own peer is
     the source (as for a v2 LOCAL).
  2. v2 is a 16-byte binary header: the 12-byte signature, version 2 with command LOCAL (0, a
     health check from the balancer itself: the peer is the source) or PROXY (1), the address
     family and transport, and the length of what follows.
  3. For PROXY: INET (4-byte addresses) and INET6 (16-byte) over STREAM are read; AF_UNSPEC
     means "no address" (the peer is the source). UNIX sockets and datagrams are refused: a
     client identity on an egress proxy is an IP address.
  4. What follows the addresses are TLVs (type, 16-bit length, value). Each is bounds-checked
     against the header's length, and then ignored: the proxy needs none of them.
  5. The header's declared length is capped at `MAX_V2_PAYLOAD` (see there).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from proxy.core.hosts import IPAddress, parse_ipv4_strict
from proxy.errors import BadRequest, Reason

V1_PREFIX: Final = b"PROXY "
# Section 2.1: "the maximum line lengths the receiver must support including the CRLF are
# 107 characters" (the longest TCP6 line).
V1_MAX_LINE: Final = 107
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_BYTES: Final = 16
# What may follow the 16 fixed bytes: addresses (at most 216, for AF_UNIX) and TLVs. HAProxy
# sends at most a few hundred bytes of TLVs (ALPN, authority, SSL fields, unique id of up to 128
# bytes); cloud balancers send one endpoint id. 4 KiB holds all of that and keeps a peer from
# announcing 64 KiB and holding a connection open on it.
MAX_V2_PAYLOAD: Final = 4096
_INET_ADDRESSES: Final = 12  # 4 + 4 + 2 + 2
_INET6_ADDRESSES: Final = 36  # 16 + 16 + 2 + 2
_TLV_HEADER: Final = 3  # type (1) + length (2)
_V1_PROTOCOLS: Final = ("TCP4", "TCP6", "UNKNOWN")


class Command(IntEnum):
    LOCAL = 0
    PROXY = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyHeader:
    """A parsed header. `source` is None when it names no client (v2 LOCAL or AF_UNSPEC, v1
    UNKNOWN): the connection's own peer is then the source."""

    version: int
    command: Command
    source: tuple[IPAddress, int] | None
    destination: tuple[IPAddress, int] | None
    length: int  # bytes the header took from the stream


def _invalid(message: str) -> BadRequest:
    return BadRequest(f"PROXY protocol header: {message}", reason=Reason.PROXY_PROTOCOL_INVALID)


def starts_like_proxy_header(data: bytes | bytearray) -> bool:
    """Whether `data` (at least one byte) begins like a v1 or v2 header, as far as it goes.
    The listener asks this of a peer it does not trust, to refuse the header by name."""
    for prefix in (V1_PREFIX, V2_SIGNATURE):
        size = min(len(data), len(prefix))
        if size and data[:size] == prefix[:size]:
            return True
    return False


def parse_proxy_header(data: bytes | bytearray) -> ProxyHeader | None:
    """The header at the start of `data`, None while it is incomplete; BadRequest when `data`
    cannot be (the beginning of) one."""
    head = bytes(data[:V2_HEADER_BYTES])
    if head and V2_SIGNATURE.startswith(head[: len(V2_SIGNATURE)]):
        return _parse_v2(data)
    if head and V1_PREFIX.startswith(head[: len(V1_PREFIX)]):
        return _parse_v1(data)
    if not head:
        return None
    raise _invalid("the connection does not start with one")


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_LINE)
    if end < 0:
        if len(data) >= V1_MAX_LINE:
            raise _invalid(f"v1 line longer than {V1_MAX_LINE} bytes")
        if b"\n" in data:
            raise _invalid("v1 line ends without CRLF")
        return None
    line = bytes(data[:end])
    if not line.isascii():
        raise _invalid("v1 line is not ASCII")
    fields = line.decode("ascii").split(" ")
    protocol = fields[1] if len(fields) > 1 else ""
    if protocol not in _V1_PROTOCOLS:
        raise _invalid(f"v1 protocol must be one of {', '.join(_V1_PROTOCOLS)}")
    if protocol == "UNKNOWN":
        # Section 2.1: the receiver must ignore whatever follows UNKNOWN on the line.
        return ProxyHeader(
            version=1, command=Command.PROXY, source=None, destination=None, length=end + 2
        )
    if len(fields) != 6:
        raise _invalid("v1 line must be PROXY TCP4|TCP6 src dst sport dport")
    version = 4 if protocol == "TCP4" else 6
    source = (_v1_address(fields[2], version), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], version), _v1_port(fields[5]))
    return ProxyHeader(
        version=1, command=Command.PROXY, source=source, destination=destination, length=end + 2
    )


def _v1_address(text: str, version: int) -> IPAddress:
    if version == 4:
        try:
            address = parse_ipv4_strict(text)
        except BadRequest:
            address = None
        if address is None:
            raise _invalid(f"{text[:40]!r} is not a dotted-quad IPv4 address")
        return address
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise _invalid(f"{text[:46]!r} is not an IPv6 address") from None


def _v1_port(text: str) -> int:
    # Section 2.1: decimal, 0..65535, no leading zero (the same text a sender would write).
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise _invalid(f"{text[:8]!r} is not a port")
    port = int(text)
    if port > 65535:
        raise _invalid(f"{port} is not a port")
    return port


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    if len(data) < V2_HEADER_BYTES:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise _invalid(f"v2 signature with version {version}")
    if command not in (Command.LOCAL, Command.PROXY):
        raise _invalid(f"v2 command {command} is neither LOCAL nor PROXY")
    family, transport = data[13] >> 4, data[13] & 0x0F
    payload = int.from_bytes(data[14:16], "big")
    if payload > MAX_V2_PAYLOAD:
        raise _invalid(f"v2 header announces {payload} bytes, over {MAX_V2_PAYLOAD}")
    total = V2_HEADER_BYTES + payload
    if len(data) < total:
        return None
    body = bytes(data[V2_HEADER_BYTES:total])
    if command == Command.LOCAL:
        # Section 2.2: for LOCAL the receiver must ignore the address family and what follows.
        return ProxyHeader(
            version=2, command=Command.LOCAL, source=None, destination=None, length=total
        )
    if family == 0:  # AF_UNSPEC: "the receiver ... must use the real connection endpoints"
        return ProxyHeader(
            version=2, command=Command.PROXY, source=None, destination=None, length=total
        )
    if transport != 1:
        raise _invalid("only STREAM (TCP) connections can be proxied here")
    if family == 1:
        size, width = _INET_ADDRESSES, 4
    elif family == 2:
        size, width = _INET6_ADDRESSES, 16
    else:
        raise _invalid("only INET and INET6 addresses can name a client here")
    if payload < size:
        raise _invalid(f"v2 address block is {payload} bytes, needs {size}")
    address: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address] = (
        ipaddress.IPv4Address if width == 4 else ipaddress.IPv6Address
    )
    src_ip = address(body[:width])
    dst_ip = address(body[width : 2 * width])
    src_port = int.from_bytes(body[2 * width : 2 * width + 2], "big")
    dst_port = int.from_bytes(body[2 * width + 2 : size], "big")
    _check_tlvs(body[size:])
    return ProxyHeader(
        version=2,
        command=Command.PROXY,
        source=(src_ip, src_port),
        destination=(dst_ip, dst_port),
        length=total,
    )


def _check_tlvs(tlvs: bytes) -> None:
    """Walk the TLVs, checking each length against what is left; their values are ignored."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < _TLV_HEADER:
            raise _invalid("v2 TLV header cut short")
        length = int.from_bytes(tlvs[offset + 1 : offset + 3], "big")
        offset += _TLV_HEADER + length
        if offset > len(tlvs):
            raise _invalid("v2 TLV longer than the header")
