"""Property-based tests of the parsers, host normalisation and policy matching.

`make test` runs each with a short budget (the `ci` profile); `make fuzz` runs the same
properties far longer (the `fuzz` profile, HYPOTHESIS_PROFILE=fuzz).
"""

from __future__ import annotations

import base64
import contextlib
import os
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.basic_auth import parse_basic_credentials
from proxy.core.clienthello import ClientHelloReader
from proxy.core.hosts import normalize_name, parse_host, split_authority
from proxy.core.hostsfile import parse_hosts
from proxy.core.http1 import (
    ChunkedDecoder,
    encode_chunk,
    find_head_end,
    parse_request_head,
    parse_response_head,
)
from proxy.core.identity import Workload, WorkloadKind
from proxy.core.policy.engine import Destination, Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import Action
from proxy.core.proxy_protocol import parse_proxy_header
from proxy.errors import BadGateway, BadRequest, OutgateError, Reason, TunnelViolation

settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "fuzz", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Bytes that look like HTTP more often than uniform noise does.
HTTP_ALPHABET = b"GETPOSTCONNECThttp:/[]@.%#:0123456789abcxyz \t\r\n\x00\x7f\xff-_,;=*"
http_like = st.lists(st.sampled_from(list(HTTP_ALPHABET)), max_size=400).map(bytes)
noise = st.binary(max_size=400)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
names = st.lists(labels, min_size=1, max_size=5).map(".".join)


@given(st.one_of(http_like, noise))
def test_request_parser_raises_only_its_own_errors(data: bytes) -> None:
    try:
        end = find_head_end(data + b"\r\n\r\n", max_head_bytes=65536)
        if end >= 0:
            parse_request_head((data + b"\r\n\r\n")[:end])
    except OutgateError:
        pass


@given(st.one_of(http_like, noise))
def test_response_parser_raises_only_bad_gateway(data: bytes) -> None:
    with contextlib.suppress(BadGateway):
        parse_response_head(data + b"\r\n\r\n", request_method="GET")


@given(
    st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
)
def test_chunked_decoder_returns_the_body_for_any_split(
    pieces: list[bytes], cuts: list[int]
) -> None:
    wire = b"".join(encode_chunk(p) for p in pieces) + b"0\r\n\r\nNEXT"
    decoder = ChunkedDecoder()
    out: list[bytes] = []
    position = 0
    for cut in cuts * (len(wire) // max(sum(cuts), 1) + 1):
        if decoder.done or position >= len(wire):
            break
        out.extend(decoder.feed(wire[position : position + cut]))
        position += cut
    if not decoder.done:
        out.extend(decoder.feed(wire[position:]))
        position = len(wire)
    assert decoder.done
    assert b"".join(out) == b"".join(pieces)
    assert decoder.tail() + wire[position:] == b"NEXT"


@given(st.one_of(http_like, noise))
def test_chunked_decoder_raises_only_bad_chunk(data: bytes) -> None:
    decoder = ChunkedDecoder()
    try:
        decoder.feed(data)
    except BadRequest as exc:
        assert exc.status == 400


@given(st.text(max_size=80))
def test_normalised_host_is_a_fixed_point(raw: str) -> None:
    try:
        once = normalize_name(raw)
    except BadRequest:
        return
    assert normalize_name(once) == once
    assert once == once.lower() and once.isascii() and not once.endswith(".")


@given(st.text(max_size=80))
def test_authority_parser_raises_only_bad_request(raw: str) -> None:
    try:
        host, port = split_authority(raw, default_port=80)
    except BadRequest:
        return
    assert 1 <= port <= 65535
    assert (
        parse_host(host.name if host.ip is None or host.ip.version == 4 else f"[{host.name}]")
        == host
    )


WORKLOAD = Workload(kind=WorkloadKind.STATIC, namespace="t", name="w", labels={"app": "a"})


@given(names, labels)
def test_a_wildcard_matches_every_subdomain_at_any_depth_and_never_the_apex(
    apex: str, sub: str
) -> None:
    policy = f"""
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {{name: p, namespace: t}}
spec:
  rules:
    - name: wild
      action: Allow
      to: [{{fqdn: "*.{apex}.example"}}]
"""
    engine = Engine.compile(load_text(policy, file="p"), default_action=Action.DENY, revision=1)

    def decide(name: str) -> str:
        dest = Destination(host=parse_host(name), port=443)
        return str(engine.decide(WORKLOAD, dest).action)

    assert decide(f"{sub}.{apex}.example") == "allow"
    assert decide(f"{sub}.{sub}.{apex}.example") == "allow"
    assert decide(f"{apex}.example") == "deny"
    assert decide(f"{sub}{apex}.example") == "deny"  # no partial-label match


# A real ClientHello prefix makes mutations reach the extension parsers, not just the header.
HELLO_START = bytes.fromhex("16030100f4010000f00303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"


@given(
    st.one_of(noise, st.binary(max_size=300).map(lambda tail: HELLO_START + tail)),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20),
)
def test_clienthello_reader_raises_only_tunnel_violations_for_any_split(
    data: bytes, cuts: list[int]
) -> None:
    reader = ClientHelloReader()
    position = 0
    try:
        for cut in cuts:
            if reader.feed(data[position : position + cut]) is not None:
                return
            position += cut
        reader.feed(data[position:])
    except TunnelViolation:
        pass
    assert reader.bytes_seen <= len(data)  # never claims bytes it was not given


# -- PROXY protocol (issue 14) ------------------------------------------------------------------
PROXY_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
proxy_like = st.one_of(
    noise,
    st.binary(max_size=120).map(lambda tail: b"PROXY " + tail),
    st.binary(max_size=200).map(lambda tail: PROXY_SIGNATURE + tail),
)
ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6)
ports = st.integers(min_value=0, max_value=65535)


@given(proxy_like)
def test_proxy_header_parser_raises_only_its_own_error(data: bytes) -> None:
    try:
        header = parse_proxy_header(data)
    except BadRequest as exc:
        assert exc.reason is Reason.PROXY_PROTOCOL_INVALID
        return
    if header is not None:
        assert 0 < header.length <= len(data)


@given(
    st.one_of(st.tuples(ipv4s, ipv4s), st.tuples(ipv6s, ipv6s)),
    ports,
    ports,
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4),
    st.binary(max_size=50),
)
def test_proxy_header_round_trips_and_every_prefix_waits(
    addresses: tuple[Any, Any],
    sport: int,
    dport: int,
    binary: bool,
    tlvs: list[tuple[int, bytes]],
    after: bytes,
) -> None:
    src, dst = addresses
    if binary:
        family = 0x11 if src.version == 4 else 0x21
        payload = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        payload += b"".join(bytes([t]) + struct.pack("!H", len(v)) + v for t, v in tlvs)
        header = PROXY_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(payload))
        header += payload
    else:
        kind = "TCP4" if src.version == 4 else "TCP6"
        header = f"PROXY {kind} {src} {dst} {sport} {dport}\r\n".encode()
    parsed = parse_proxy_header(header + after)
    assert parsed is not None
    assert parsed.source == (src, sport)
    assert parsed.destination == (dst, dport)
    assert parsed.length == len(header)
    for cut in range(len(header)):
        assert parse_proxy_header(header[:cut]) is None


# -- proxy auth and hosts files (issue 14) --------------------------------------------------------
users = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters=":"),
    min_size=1,
    max_size=30,
)
passwords = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=40)


@given(users, passwords)
def test_basic_credentials_round_trip(user: str, password: str) -> None:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert parse_basic_credentials(f"Basic {token}") == (user, password)


@given(st.one_of(st.text(max_size=200), noise.map(lambda b: "Basic " + b.decode("latin-1"))))
def test_basic_credentials_parser_never_raises(value: str) -> None:
    found = parse_basic_credentials(value)
    if found is not None:
        user, _ = found
        assert user and ":" not in user


@given(st.text(max_size=400))
def test_hosts_parser_never_raises_and_keeps_only_normalised_names(text: str) -> None:
    table = parse_hosts(text)
    for name, addresses in table.names.items():
        assert addresses and normalize_name(name) == name
