"""The compiled modules answer exactly as their Python source does (issue 16, proxy/native.py).

Both builds in one process: the compiled module as `import` finds it, and its `.py` loaded again
under another name. Same input, same result (compared field by field: the two builds' classes
are distinct objects), or the same refusal (type, reason, message); rendered heads byte for
byte. Inputs: the fuzz corpus of tests/fuzz (HTTP-like bytes and noise), the published
request-smuggling and SSRF payloads in ../shared/corpora (when present), generated request and
response heads, and the generated, real and malformed ClientHellos of
tests/tls/test_clienthello_differential.py.

Without a compiled build there is nothing to compare: the test says why and is skipped, and
fails under CI=true (tests/support/tiers.py). The rest of the suite runs once, on whichever build
is installed; docs/performance.md says why that is enough.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import native
from tests.fuzz.test_properties import http_like, noise
from tests.support.budget import budget
from tests.support.tiers import tier_unavailable
from tests.tls.hello import real_client_hello, records
from tests.tls.test_clienthello import MALFORMED
from tests.tls.test_clienthello_differential import cut_lists, framed, split

CORPORA = Path(__file__).resolve().parents[2].parent / "shared" / "corpora" / "payloads"
# Every compiled module has its comparison here: adding one to proxy.native.MODULES without one
# fails test_every_compiled_module_is_compared.
COMPARED = ("proxy.core.http1", "proxy.core.clienthello")


def load_source(name: str) -> ModuleType:
    """`name`'s `.py`, executed as a separate module `pure_<name>`."""
    alias = "pure_" + name.replace(".", "_")
    if alias in sys.modules:
        return sys.modules[alias]
    spec = importlib.util.spec_from_file_location(alias, native.source_path(name))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass(frozen=True)
class Builds:
    compiled: ModuleType
    pure: ModuleType


@pytest.fixture(scope="module", params=COMPARED)
def builds(request: pytest.FixtureRequest) -> Builds:
    name: str = request.param
    compiled = importlib.import_module(name)
    if not native.is_compiled(compiled):
        tier_unavailable("compiled-build", f"{name} runs as Python ({native.status().reason})")
    pure = load_source(name)
    assert not native.is_compiled(pure)
    return Builds(compiled, pure)


def both(name: str) -> Builds:
    compiled = importlib.import_module(name)
    if not native.is_compiled(compiled):
        tier_unavailable("compiled-build", f"{name} runs as Python ({native.status().reason})")
    return Builds(compiled, load_source(name))


def shape(value: object) -> object:
    """A value as plain data: the two builds' classes differ, their names and fields may not."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple((f.name, shape(getattr(value, f.name))) for f in dataclasses.fields(value))
        return (type(value).__name__, fields)
    if isinstance(value, Enum):
        return (type(value).__name__, value.value)
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(shape(v) for v in value))
    if isinstance(value, frozenset | set):
        return (type(value).__name__, frozenset(shape(v) for v in value))  # type: ignore[arg-type]
    if isinstance(value, dict) or hasattr(value, "items"):
        return ("mapping", tuple((k, shape(v)) for k, v in value.items()))  # type: ignore[attr-defined]
    return value


def outcome(call: Callable[..., object], *args: object, **kwargs: object) -> tuple[object, ...]:
    """`call(*args, **kwargs)`'s result as plain data, or its refusal."""
    try:
        return ("result", shape(call(*args, **kwargs)))
    except Exception as exc:
        detail = (getattr(exc, "reason", None), getattr(exc, "message", None), str(exc))
        return ("refused", type(exc).__name__, shape(detail))


# -- HTTP/1 heads -------------------------------------------------------------------------------


def head_outcomes(http1: ModuleType, data: bytes) -> Iterator[tuple[object, ...]]:
    """Everything proxy.core.http1 does with `data`: find, parse in both forms, render, read."""
    for limit in (65536, 64):
        yield outcome(http1.find_head_end, data, max_head_bytes=limit)
        yield outcome(http1.find_head_end, data, max_head_bytes=limit, is_request=False)
    end = http1.find_head_end(data + b"\r\n\r\n", max_head_bytes=65536)
    head = (data + b"\r\n\r\n")[:end] if end >= 0 else data
    for form in http1.RequestForm:
        parsed = outcome(http1.parse_request_head, head, form=form)
        yield parsed
        if parsed[0] == "result":
            req = http1.parse_request_head(head, form=form)
            yield outcome(http1.render_request_head, req)
            yield outcome(http1.render_request_head, req, framing_header=False, absolute=True)
            yield outcome(http1.target_authority, req)
            yield outcome(http1.offered_upgrade, req)
            yield outcome(req.header, "host")
            yield outcome(req.header_values, "connection")
    for method in ("GET", "HEAD", "CONNECT"):
        parsed = outcome(http1.parse_response_head, head, request_method=method)
        yield parsed
        if parsed[0] == "result":
            resp = http1.parse_response_head(head, request_method=method)
            yield outcome(http1.render_response_head, resp, keep_alive=True)
            yield outcome(http1.render_response_head, resp, keep_alive=False)
            yield outcome(http1.check_switch, resp, offered="websocket")
    decoder = http1.ChunkedDecoder()
    yield outcome(decoder.feed, data)
    yield (decoder.done, decoder.tail())
    yield outcome(http1.encode_chunk, data)


def assert_same_heads(data: bytes) -> None:
    http1 = both("proxy.core.http1")
    assert list(head_outcomes(http1.compiled, data)) == list(head_outcomes(http1.pure, data))


@budget(300, fuzz_factor=100)
@given(st.one_of(http_like, noise))
def test_the_fuzz_corpus_gets_the_same_heads(data: bytes) -> None:
    assert_same_heads(data)


def corpus() -> list[tuple[str, bytes]]:
    if not CORPORA.is_dir():
        return []
    found = []
    for path in sorted(CORPORA.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            entry: dict[str, Any] = json.loads(line)
            if "b64" in entry:
                found.append((entry["id"], base64.b64decode(entry["b64"])))
    return found


def test_the_published_attack_payloads_get_the_same_heads() -> None:
    payloads = corpus()
    if not payloads:
        pytest.skip(f"no corpus at {CORPORA} (a checkout without ../shared/corpora)")
    for ident, data in payloads:
        try:
            assert_same_heads(data)
        except AssertionError:
            pytest.fail(f"the builds differ on {ident}")


tokens = st.sampled_from(["GET", "POST", "CONNECT", "OPTIONS", "HEAD", "PUT", "G\x00T", ""])
targets = st.sampled_from(
    [
        "http://api.example.com/v1/items?page=2",
        "http://[::1]:8080/",
        "https://x.test/",
        "api.example.com:443",
        "/relative",
        "*",
        "http://user@host/",
        "http://h%00st/",
        "ftp://x.test/",
    ]
)
field_names = st.sampled_from(
    [
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Upgrade",
        "Expect",
        "Keep-Alive",
        "Proxy-Authorization",
        "X-Custom",
        "Bad Name",
        "",
    ]
)
field_values = st.one_of(
    st.sampled_from(
        [
            "api.example.com",
            "0",
            "12",
            "-1",
            "chunked",
            "gzip, chunked",
            "close",
            "upgrade",
            "websocket",
            "100-continue",
            "keep-alive",
            " padded ",
            "a\tb",
            "x\x00y",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=20),
)
line_ends = st.sampled_from(["\r\n", "\r\n", "\r\n", "\n", "\r"])


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """A request head as clients send it, or off by one token, field or line end."""
    end = draw(line_ends)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "http/1.1"]))
    lines = [f"{draw(tokens)} {draw(targets)} {version}"]
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        separator = draw(st.sampled_from([": ", ":", " : ", ":\t"]))
        lines.append(f"{draw(field_names)}{separator}{draw(field_values)}")
    if draw(st.booleans()):
        lines.append(" folded continuation")
    return (end.join(lines) + end + end).encode("utf-8")


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    status = draw(
        st.sampled_from(
            [
                "200 OK",
                "101 Switching Protocols",
                "204 No Content",
                "304 Not Modified",
                "100 Continue",
                "999 X",
                "20 Short",
            ]
        )
    )
    lines = [f"{draw(st.sampled_from(['HTTP/1.1', 'HTTP/1.0', 'HTTP/2']))} {status}"]
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        lines.append(f"{draw(field_names)}: {draw(field_values)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@budget(400, fuzz_factor=100)
@given(st.one_of(request_heads(), response_heads()))
def test_generated_heads_get_the_same_answers(data: bytes) -> None:
    assert_same_heads(data)


# -- ClientHello ---------------------------------------------------------------------------------


def hello_outcomes(clienthello: ModuleType, pieces: list[bytes]) -> list[tuple[object, ...]]:
    reader = clienthello.ClientHelloReader()
    return [
        outcome(lambda piece=piece: (reader.feed(piece), reader.bytes_seen)) for piece in pieces
    ]


def assert_same_hellos(data: bytes, cuts: list[int]) -> None:
    hello = both("proxy.core.clienthello")
    for pieces in (split(data, cuts), [data, b"\x16"]):
        assert hello_outcomes(hello.compiled, pieces) == hello_outcomes(hello.pure, pieces)


@budget(400, fuzz_factor=100)
@given(st.one_of(framed(), noise), cut_lists)
def test_generated_hellos_get_the_same_answers(data: bytes, cuts: list[int]) -> None:
    assert_same_hellos(data, cuts)


@pytest.mark.parametrize("server_name", ["api.example.com", None])
def test_real_and_malformed_hellos_get_the_same_answers(server_name: str | None) -> None:
    real = real_client_hello(server_name)
    for data in (real, records(real[5:], 7, 100), *MALFORMED):
        for cuts in ([], [1], [3] * 40):
            assert_same_hellos(data, cuts)


# -- the list --------------------------------------------------------------------------------------


def test_every_compiled_module_is_compared(builds: Builds) -> None:
    assert sorted(COMPARED) == sorted(native.MODULES)
    assert native.is_compiled(builds.compiled) and not native.is_compiled(builds.pure)
