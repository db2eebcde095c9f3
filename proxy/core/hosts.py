"""Host normalisation and strict parsing of IP literals, authorities and ports.

The same `normalize_name` runs on rule names when a policy loads and on request hosts when a
request arrives, so the two always compare in one form: lowercase, IDNA (UTS #46) to punycode,
trailing dot removed.

IP literals are strict: only canonical dotted-quad IPv4 and bracketed IPv6. Anything a URL
parser or `inet_aton` would read as a number in another form (decimal `2130706433`, octal
`0177.0.0.1`, hex `0x7f.1`, short `127.1`) is refused rather than guessed, because those forms
are how address guards get bypassed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

from proxy.errors import BadRequest, Reason

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 1035 section 2.3.4: 63 octets a label, 255 a name on the wire (253 characters in text).
MAX_LABEL_LENGTH = 63
MAX_NAME_LENGTH = 253

# Letters, digits, hyphen (RFC 1123), plus underscore: real service names carry it and DNS
# allows it; everything else (spaces, %, /, control bytes) is refused.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_DOTTED_QUAD_OCTET = re.compile(r"(?:0|[1-9][0-9]{0,2})\Z")
# A label that a WHATWG URL parser or inet_aton would read as a number: decimal, octal or hex.
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9a-fA-F]*)\Z")
_PORT = re.compile(r"[1-9][0-9]{0,4}\Z")


def _bad_target(message: str) -> BadRequest:
    return BadRequest(message, reason=Reason.BAD_TARGET)


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    """A request host: a normalised name, or an IP literal (then `name` is its text form)."""

    name: str
    ip: IPAddress | None = None

    @property
    def is_ip(self) -> bool:
        return self.ip is not None


def normalize_name(raw: str) -> str:
    """Return the canonical form of a DNS name or raise BadRequest (reason bad_target)."""
    if not raw or len(raw) > MAX_NAME_LENGTH + 1:
        raise _bad_target("host name is empty or too long")
    name = raw[:-1] if raw.endswith(".") else raw
    if not name:
        raise _bad_target("host name is empty")
    if name.isascii():
        name = name.lower()
    else:
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise _bad_target(f"host name is not valid IDNA: {exc}") from None
    if len(name) > MAX_NAME_LENGTH:
        raise _bad_target("host name is longer than 253 characters")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise _bad_target(f"host name has an invalid label {label[:64]!r}")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError:
                raise _bad_target(f"host name has an invalid punycode label {label!r}") from None
    return name


def parse_ipv4_strict(text: str) -> ipaddress.IPv4Address | None:
    """Canonical dotted quad -> address; a numeric form of any other shape -> BadRequest.

    Returns None when `text` is not an attempt at an IPv4 address at all (it is a name).
    """
    trimmed = text[:-1] if text.endswith(".") else text
    labels = trimmed.split(".")
    if not _NUMERIC_LABEL.match(labels[-1]):
        return None  # A name: its last label is not numeric (WHATWG "ends in a number").
    if len(labels) != 4 or trimmed != text:
        raise _bad_target(f"non-canonical IPv4 literal {text[:64]!r}: use a dotted quad a.b.c.d")
    for label in labels:
        if not _DOTTED_QUAD_OCTET.match(label) or int(label) > 255:
            raise _bad_target(
                f"non-canonical IPv4 literal {text[:64]!r}: use a dotted quad a.b.c.d"
            )
    return ipaddress.IPv4Address(trimmed)


def parse_host(raw: str) -> Host:
    """Parse the host part of an authority: `[v6]`, canonical IPv4, or a DNS name."""
    if not raw:
        raise _bad_target("empty host")
    if raw.startswith("["):
        if not raw.endswith("]"):
            raise _bad_target("unterminated IPv6 literal")
        inner = raw[1:-1]
        if "%" in inner:
            raise _bad_target("IPv6 zone identifiers are not accepted")
        try:
            v6 = ipaddress.IPv6Address(inner)
        except ValueError:
            raise _bad_target(f"bracketed host is not an IPv6 address: {raw[:64]!r}") from None
        return Host(name=str(v6), ip=v6)
    if ":" in raw or "]" in raw:
        raise _bad_target("IPv6 literals must be bracketed")
    v4 = parse_ipv4_strict(raw)
    if v4 is not None:
        return Host(name=str(v4), ip=v4)
    name = normalize_name(raw)
    if _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):
        # Only non-ASCII input gets here: IDNA maps fullwidth or superscript digits to ASCII
        # (U+FF11 U+FF12 U+FF17 ... -> "127.0.0.1"). Such a "name" reads as an address to anyone
        # downstream; it is neither a canonical literal nor a real name, so it is refused.
        raise _bad_target(f"host {raw[:64]!r} normalises to a numeric form")
    return Host(name=name)


def parse_port(raw: str) -> int:
    """Decimal 1..65535 with no sign, no leading zero and nothing else."""
    if not _PORT.match(raw) or int(raw) > 65535:
        raise BadRequest(f"invalid port {raw[:16]!r}", reason=Reason.BAD_PORT)
    return int(raw)


def split_authority(authority: str, *, default_port: int | None) -> tuple[Host, int]:
    """`host[:port]` (RFC 9110 section 4.2) -> (Host, port). Userinfo is refused.

    `default_port=None` means the port is required (CONNECT's authority-form).
    """
    if "@" in authority:
        raise _bad_target("userinfo is not accepted in the target")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise _bad_target("unterminated IPv6 literal")
        host_part, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _bad_target("junk after IPv6 literal")
        port_part: str | None = rest[1:] if rest else None
    elif ":" in authority:
        host_part, _, port_part = authority.rpartition(":")
    else:
        host_part, port_part = authority, None
    if port_part is None:
        if default_port is None:
            raise BadRequest("a port is required", reason=Reason.BAD_PORT)
        port = default_port
    else:
        port = parse_port(port_part)
    return parse_host(host_part), port


def parse_ip_address(text: str) -> IPAddress:
    """A bare address as it comes from a socket or a DNS answer (no brackets)."""
    return ipaddress.ip_address(text)


def unmap_ipv4(ip: IPAddress) -> IPAddress:
    """`::ffff:a.b.c.d` -> `a.b.c.d`: dual-stack listeners report IPv4 peers in that form."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
