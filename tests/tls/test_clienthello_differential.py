"""The one-pass ClientHello parser answers exactly as the field-by-field one it replaced
(tests/tls/reference_clienthello.py): the same `ClientHello`, or the same refusal (type, reason
and message), after every piece fed, with the same `bytes_seen`, on the fuzz corpus of
tests/fuzz (noise, a real hello's prefix with any tail), on real OpenSSL hellos, on every
malformed shape of test_clienthello.py, and on generated hellos that are then framed into
records, cut short or mutated, and fed in pieces of any size.

The default run is short (`make test`); HYPOTHESIS_PROFILE=fuzz runs many more examples.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.clienthello import MAX_CLIENT_HELLO_BYTES, ClientHello, ClientHelloReader
from proxy.errors import TunnelViolation
from tests.support.budget import budget
from tests.tls.hello import (
    ALPN,
    ECH,
    ESNI,
    SERVER_NAME,
    SUPPORTED_VERSIONS,
    handshake,
    real_client_hello,
    records,
    vec,
)
from tests.tls.reference_clienthello import ReferenceClientHelloReader
from tests.tls.test_clienthello import MALFORMED

Outcome = tuple[object, ...]


def outcomes(
    reader: ClientHelloReader | ReferenceClientHelloReader, pieces: list[bytes]
) -> list[Outcome]:
    """What each feed returned or raised, and bytes_seen after it."""
    seen: list[Outcome] = []
    for piece in pieces:
        try:
            result: ClientHello | None = reader.feed(piece)
        except TunnelViolation as exc:
            seen.append(("refused", type(exc), exc.reason, exc.message, reader.bytes_seen))
        else:
            seen.append(("result", result, reader.bytes_seen))
    return seen


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` in pieces of the sizes in `cuts`, then the rest, then one more byte (fed after the
    end: a finished reader keeps its answer)."""
    pieces, position = [], 0
    for cut in cuts:
        pieces.append(data[position : position + cut])
        position += cut
    pieces.append(data[position:])
    pieces.append(b"\x16")
    return pieces


def assert_same(data: bytes, cuts: list[int]) -> None:
    pieces = split(data, cuts)
    expected = outcomes(ReferenceClientHelloReader(), pieces)
    assert outcomes(ClientHelloReader(), pieces) == expected
    whole = [data, b"\x16"]  # the fast path: the first read holds the whole record
    assert outcomes(ClientHelloReader(), whole) == outcomes(ReferenceClientHelloReader(), whole)


cut_lists = st.lists(st.integers(min_value=0, max_value=80), max_size=12)

# -- the fuzz corpus of tests/fuzz/test_properties.py ------------------------------------------

HELLO_START = bytes.fromhex("16030100f4010000f00303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
noise = st.binary(max_size=400)


@budget(300, fuzz_factor=100)
@given(st.one_of(noise, st.binary(max_size=300).map(lambda tail: HELLO_START + tail)), cut_lists)
def test_the_fuzz_corpus_gets_the_same_answers(data: bytes, cuts: list[int]) -> None:
    assert_same(data, cuts)


# -- real and malformed hellos -------------------------------------------------------------------


@pytest.mark.parametrize("server_name", ["api.example.com", None, ".".join(["x" * 60] * 4)])
@pytest.mark.parametrize("cuts", [[], [1], [5], [9, 100], [3] * 40, [300]])
def test_real_hellos_get_the_same_answers(server_name: str | None, cuts: list[int]) -> None:
    real = real_client_hello(server_name)
    assert_same(real, cuts)
    assert_same(records(real[5:], 7, 100), cuts)  # the same message over three records


@pytest.mark.parametrize("data", MALFORMED)
@pytest.mark.parametrize("step", [1, 3, 4096])
def test_malformed_hellos_get_the_same_answers(data: bytes, step: int) -> None:
    assert_same(data, [step] * (len(data) // step))


# -- generated hellos ----------------------------------------------------------------------------

# Names and protocols as clients send them, next to every shape the rules refuse.
names = st.one_of(
    st.sampled_from([b"origin.test", b"a", b"x" * 255, b"x" * 256, b"", b"a\x00b", b"caf\xc3\xa9"]),
    st.binary(max_size=24),
)


# Appended inside a vector: nothing, or a length that runs past what is left, or a cut length.
LYING_TAILS = [b"", b"", b"", b"\x05ab", b"\x00\x00\x09ab", b"\x00", b"\x00\x00"]


@st.composite
def server_name_data(draw: st.DrawFn) -> bytes:
    entries = b"".join(
        bytes([draw(st.sampled_from([0, 0, 0, 1, 255]))]) + vec(2, draw(names))
        for _ in range(draw(st.integers(min_value=0, max_value=2)))
    )
    entries += draw(st.sampled_from(LYING_TAILS))
    return vec(2, entries) + draw(st.sampled_from([b"", b"", b"x"]))


@st.composite
def alpn_data(draw: st.DrawFn) -> bytes:
    protocols = draw(st.lists(st.binary(max_size=12), max_size=4))
    listed = b"".join(vec(1, p) for p in protocols) + draw(st.sampled_from(LYING_TAILS))
    return vec(2, listed) + draw(st.sampled_from([b"", b"", b"y"]))


extension = st.one_of(
    st.tuples(st.just(SERVER_NAME), server_name_data()),
    st.tuples(st.just(ALPN), alpn_data()),
    st.tuples(st.just(SUPPORTED_VERSIONS), st.just(vec(1, b"\x03\x04\x03\x03"))),
    st.tuples(st.sampled_from([ECH, ESNI, 10, 13, 21, 51]), st.binary(max_size=40)),
)


# Each field of a hello: the values a client sends, then values the rules refuse. One field at
# most is broken per hello, so most generated hellos reach the extensions and their vectors.
FIELDS: dict[str, tuple[list[bytes], list[bytes]]] = {
    "version": ([b"\x03\x03", b"\x03\x01"], [b"\x02\x00", b"\x04\x03", b"\x03"]),
    "random": ([bytes(32)], [bytes(30), bytes(31)]),
    "session_id": ([vec(1, b""), vec(1, bytes(32))], [vec(1, bytes(33)), b"\x05\x00"]),
    "suites": ([vec(2, b"\x13\x01\x13\x02"), vec(2, b"\x13\x01")], [vec(2, b""), vec(2, b"\x13")]),
    "compression": ([vec(1, b"\x00")], [vec(1, b""), b""]),
    "after": ([b""], [b"\x00", b"junk"]),
    "msg_type": ([b"\x01"], [b"\x02", b"\x0b"]),
}


@st.composite
def hello_messages(draw: st.DrawFn) -> bytes:
    """A ClientHello handshake message, well formed or broken in one field or extension."""
    broken = draw(st.sampled_from([None, None, None, None, *FIELDS]))

    def field(name: str) -> bytes:
        good, bad = FIELDS[name]
        return draw(st.sampled_from(bad if name == broken else good))

    body = b"".join(
        field(name) for name in ("version", "random", "session_id", "suites", "compression")
    )
    if draw(st.sampled_from([True, True, True, False])):
        blob = b"".join(
            struct.pack(">HH", kind, len(data)) + data
            for kind, data in draw(st.lists(extension, max_size=6))
        )
        body += vec(2, blob + draw(st.sampled_from([b"", b"", b"", b"\x00", b"\x00\x10\x00"])))
    body += field("after")
    return handshake(body, msg_type=field("msg_type")[0])


@st.composite
def framed(draw: st.DrawFn) -> bytes:
    """A generated hello in records, then maybe cut short, mutated, or followed by more."""
    message = draw(hello_messages())
    sizes = draw(st.lists(st.integers(min_value=1, max_value=200), max_size=3))
    version = draw(st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x01", b"\x03\x05"]))
    data = records(message, *sizes, version=version)
    sometimes = st.sampled_from([True, False, False, False])
    if draw(sometimes):  # one byte changed anywhere: lengths, types, versions
        index = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data = data[:index] + bytes([draw(st.integers(0, 255))]) + data[index + 1 :]
    if draw(sometimes):
        data = data[: draw(st.integers(min_value=0, max_value=len(data)))]
    return data + draw(st.sampled_from([b"", b"\x17\x03\x03\x00\x01x", b"\x16\x03\x01"]))


@budget(600, fuzz_factor=100)
@given(framed(), cut_lists)
def test_generated_hellos_get_the_same_answers(data: bytes, cuts: list[int]) -> None:
    assert_same(data, cuts)


def test_a_hello_at_the_size_limit_gets_the_same_answer() -> None:
    def message_with(padding: int) -> bytes:
        body = b"\x03\x03" + bytes(32) + b"\x00" + vec(2, b"\x13\x01") + b"\x01\x00"
        return handshake(body + vec(2, struct.pack(">HH", 21, padding) + bytes(padding)))

    message = message_with(MAX_CLIENT_HELLO_BYTES - len(message_with(0)))
    assert len(message) == MAX_CLIENT_HELLO_BYTES
    data = records(message, *([16384] * 3))
    assert_same(data, [])
    assert_same(data, [16389, 5])
    assert_same(records(message + b"\x00", *([16384] * 4)), [])  # one byte over
