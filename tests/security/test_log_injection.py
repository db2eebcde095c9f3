"""CRLF and control characters aimed at the audit log: whatever a client sends, every record
stays one valid JSON line, raw client strings are bounded, and forged fields stay strings."""

from __future__ import annotations

import pytest

from tests.security.conftest import Range

REQUESTS = [
    (
        "raw-crlf-in-path",
        b'GET http://a.public.test/a\r\nX: {"event": 1} HTTP/1.1\r\nHost: a\r\n\r\n',
    ),
    ("raw-cr-in-path", b"GET http://a.public.test/a\rb HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("raw-lf-in-path", b"GET http://a.public.test/a\nb HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("nul-in-path", b"GET http://a.public.test/a\x00b HTTP/1.1\r\nHost: a\r\n\r\n"),
    (
        "escape-in-header",
        b"GET http://a.public.test/ HTTP/1.1\r\nHost: a\r\nUser-Agent: \x1b[31mred\r\n\r\n",
    ),
    ("del-in-header", b"GET http://a.public.test/ HTTP/1.1\r\nHost: a\r\nX-A: a\x7fb\r\n\r\n"),
    ("control-in-method", b"G\x01ET http://a.public.test/ HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("utf8-in-path", "GET http://a.public.test/\u2028\u2029 HTTP/1.1\r\nHost: a\r\n\r\n".encode()),
    ("json-in-method", b'GE"T http://a.public.test/ HTTP/1.1\r\nHost: a\r\n\r\n'),
    ("backspace-in-host", b"GET http://a.public\x08.test/ HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("crlf-in-connect-host", b"CONNECT a.public.test\r\n:80 HTTP/1.1\r\nHost: a\r\n\r\n"),
    (
        "latin1-in-header-value",
        b"GET http://denied.example/ HTTP/1.1\r\nHost: a\r\nX-A: \xff\xfe\r\n\r\n",
    ),
]


@pytest.mark.parametrize("raw", [r for _, r in REQUESTS], ids=[i for i, _ in REQUESTS])
def test_hostile_bytes_leave_one_valid_json_line_per_record(
    attack_range: Range, raw: bytes
) -> None:
    attack = attack_range.send(raw, half_close=True)
    assert attack.status in (400, 403), attack.data[:200]
    attack_range.records(attack, "close")
    attack_range.every_audit_line_is_one_json_object()
    for record in attack_range.proxy.records:
        assert set(record) <= {
            "@timestamp",
            "event",
            "source",
            "destination",
            "outgate",
            "kubernetes",
            "http",
            "url",
            "rule",
            "tls",
        }
    attack_range.nothing_reached_forbidden()


def test_percent_encoded_crlf_stays_encoded_in_the_record(attack_range: Range) -> None:
    raw = b"GET http://denied.example/a%0d%0aX-Injected:%201 HTTP/1.1\r\nHost: a\r\n\r\n"
    attack = attack_range.send(raw, half_close=True)
    assert attack.status == 403
    decision = attack_range.decision(attack)
    assert decision["url"]["path"] == "/a%0d%0aX-Injected:%201"
    attack_range.every_audit_line_is_one_json_object()


def test_a_very_long_path_is_truncated_in_the_record(attack_range: Range) -> None:
    path = "/" + "a" * 7000
    raw = f"GET http://denied.example{path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    attack = attack_range.send(raw, half_close=True)
    assert attack.status == 403
    decision = attack_range.decision(attack)
    recorded = decision["url"]["path"]
    assert recorded.startswith("/aaaa") and recorded.endswith("...[truncated]")
    assert len(recorded) < 1100
    line = next(x for x in attack_range.proxy.raw_stdout if decision["event"]["id"].encode() in x)
    assert len(line) < 4096


def test_an_idn_host_is_recorded_in_punycode(attack_range: Range) -> None:
    raw = "CONNECT bücher.example:443 HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    attack = attack_range.send(raw, half_close=True)
    assert attack.status in (400, 403)
    attack_range.every_audit_line_is_one_json_object()
