"""Squid's access.log format: the pure formatter, the config keys, the audit sink writing both
kinds of line, and a proxy started as the CLI does writing lines a Squid log parser reads."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.adoption.squid_log import (
    COMMON_FORMAT,
    NATIVE_FORMAT,
    AccessEntry,
    access_entry,
    format_entry,
    parse_logformat,
    result_code,
)
from proxy.audit import AuditSink, Exchange
from proxy.config import Settings, settings_from_mapping
from proxy.core.identity import Workload, WorkloadKind
from proxy.errors import ConfigError, Reason
from tests.support.clients import curl
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI
from tests.support.proxyproc import ProxyProcess
from tests.support.waiting import wait_for

StartProxy = Callable[..., ProxyProcess]

# The field layout of Squid's native access.log as log parsers read it (logstash's SQUID3 grok
# pattern and Squid's wiki "Squid native access.log format"): time, elapsed, client,
# code/status, bytes, method, URL, user, hierarchy/peer, type, separated by whitespace.
SQUID_NATIVE = re.compile(
    r"(?P<time>\d+\.\d{3})\s+(?P<elapsed>\d+)\s(?P<client>\S+)\s"
    r"(?P<code>[A-Z_]+)/(?P<status>\d{3})\s(?P<bytes>\d+)\s(?P<method>[A-Z]+)\s"
    r"(?P<url>\S+)\s(?P<user>\S+)\s(?P<hierarchy>[A-Z_]+)/(?P<peer>\S+)\s(?P<type>\S+)\Z"
)

POD = Workload(
    kind=WorkloadKind.POD,
    namespace="payments",
    name="api-7d9f",
    owner_kind="Deployment",
    owner_name="api",
)


def exchange(**fields: Any) -> Exchange:
    defaults: dict[str, Any] = {
        "kind": "forward",
        "source_ip": "10.1.2.3",
        "source_port": 40000,
        "workload": POD,
        "destination_domain": "api.example.com",
        "destination_port": 80,
        "method": "GET",
        "path": "/v1/items?token=secret",
    }
    defaults.update(fields)
    return Exchange(**defaults)


def entry_for(ex: Exchange, reason: str = "completed", **times: float) -> AccessEntry:
    return access_entry(
        ex,
        reason,
        end_time=times.get("end", 1_700_000_000.25),
        now_monotonic=ex.started + times.get("elapsed", 0.18),
    )


# -- the formatter -------------------------------------------------------------------------------


def test_an_allowed_forwarded_request_is_a_tcp_miss_line_with_the_peer_address() -> None:
    ex = exchange(decided=True, destination_ip="93.184.216.34", status=200, destination_bytes=411)
    line = format_entry(entry_for(ex), parse_logformat("squid"))
    assert line == (
        "1700000000.250    180 10.1.2.3 TCP_MISS/200 411 GET http://api.example.com/v1/items "
        "- HIER_DIRECT/93.184.216.34 -"
    )
    assert SQUID_NATIVE.match(line)


def test_a_tunnel_is_tcp_tunnel_200_with_the_authority_as_url() -> None:
    ex = exchange(
        kind="tunnel", method="CONNECT", path=None, destination_port=443, decided=True,
        destination_ip="93.184.216.34", destination_bytes=5000,
    )  # fmt: skip
    fields = SQUID_NATIVE.match(format_entry(entry_for(ex), parse_logformat("squid")))
    assert fields is not None
    assert (fields["code"], fields["status"], fields["method"], fields["url"]) == (
        "TCP_TUNNEL", "200", "CONNECT", "api.example.com:443",
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["transparent-tls", "port-map"])
def test_a_transparent_tunnel_is_logged_as_squid_logs_its_intercepted_tls(kind: str) -> None:
    ex = exchange(
        kind=kind, method=None, path=None, destination_port=443, decided=True,
        destination_ip="93.184.216.34", destination_bytes=5000,
    )  # fmt: skip
    fields = SQUID_NATIVE.match(format_entry(entry_for(ex), parse_logformat("squid")))
    assert fields is not None
    assert (fields["code"], fields["status"], fields["method"], fields["url"]) == (
        "TCP_TUNNEL", "200", "CONNECT", "api.example.com:443",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "decided", "status", "close_reason", "expected"),
    [
        ("forward", False, 403, "rule_deny", "TCP_DENIED"),
        ("tunnel", False, 403, "guarded_address", "TCP_DENIED"),
        ("forward", False, 429, "connection_limit", "TCP_DENIED"),
        ("forward", False, 400, "malformed_request", "TAG_NONE"),
        ("forward", False, 502, "dns_nxdomain", "TCP_MISS"),
        ("forward", True, 200, "completed", "TCP_MISS"),
        ("forward", True, 200, "client_closed", "TCP_MISS_ABORTED"),
        ("tunnel", True, None, "idle_timeout", "TCP_TUNNEL_TIMEDOUT"),
        ("tunnel", True, None, "completed", "TCP_TUNNEL"),
        ("transparent-tls", False, 403, "sni_missing", "TCP_DENIED"),
        ("port-map", True, None, "completed", "TCP_TUNNEL"),
        ("transparent-http", True, 200, "completed", "TCP_MISS"),
    ],
)
def test_result_codes_use_squids_vocabulary(
    kind: str, decided: bool, status: int | None, close_reason: str, expected: str
) -> None:
    assert (
        result_code(kind=kind, decided=decided, status=status, close_reason=close_reason)
        == expected
    )


def test_a_proxy_auth_user_is_the_user_column() -> None:
    ex = exchange(decided=True, destination_ip="93.184.216.34", status=200, user_name="al ice")
    line = format_entry(entry_for(ex), parse_logformat("squid"))
    assert " GET http://api.example.com/v1/items al%20ice HIER_DIRECT/" in line
    assert SQUID_NATIVE.match(line)
    assert format_entry(entry_for(ex), parse_logformat("%un|%ul")) == "al%20ice|al%20ice"


def test_an_unparseable_request_is_logged_as_squid_logs_one() -> None:
    ex = exchange(destination_domain=None, destination_port=None, method=None, status=400)
    line = format_entry(entry_for(ex, "malformed_request"), parse_logformat("squid"))
    assert " TAG_NONE/400 0 NONE error:invalid-request - HIER_NONE/- -" in line


def test_fields_never_carry_spaces_or_line_breaks() -> None:
    ex = exchange(path="/a b\r\nX: y", decided=True, destination_ip="10.0.0.1", status=200)
    line = format_entry(entry_for(ex), parse_logformat("squid"))
    assert "\n" not in line and "\r" not in line
    assert "http://api.example.com/a%20b%0D%0AX:%20y" in line
    assert SQUID_NATIVE.match(line)


def test_ipv6_and_non_default_ports_are_written_as_urls_write_them() -> None:
    ex = exchange(
        destination_domain=None, destination_ip="2001:db8::1", destination_port=8080,
        decided=True, status=204, path="/x",
    )  # fmt: skip
    line = format_entry(entry_for(ex), parse_logformat("squid"))
    assert " http://[2001:db8::1]:8080/x " in line


def test_common_format_and_a_custom_format_with_widths_and_notes() -> None:
    ex = exchange(decided=True, destination_ip="10.0.0.1", status=200, destination_bytes=7)
    common = format_entry(entry_for(ex), parse_logformat("common"))
    assert re.fullmatch(
        r"10\.1\.2\.3 - - \[\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] "
        r'"GET http://api\.example\.com/v1/items HTTP/1\.1" 200 7 TCP_MISS:HIER_DIRECT',
        common,
    )
    assert parse_logformat("common").text == COMMON_FORMAT
    custom = parse_logformat('%-8rm|%05>p|%"{workload}note|%{namespace}note|%>rd|%tg')
    line = format_entry(entry_for(ex), custom)
    assert line.startswith('GET     |40000|"Deployment/api"|payments|api.example.com|')
    assert line.endswith("14/Nov/2023:22:13:20 +0000")


def test_unsupported_codes_are_refused_with_every_one_named() -> None:
    with pytest.raises(ValueError, match=r"%la .*%\{user\}note|%la.*user") as caught:
        parse_logformat("%ts %la %{user}note %ru")
    assert "supported:" in str(caught.value)
    assert parse_logformat("squid").text == NATIVE_FORMAT
    assert parse_logformat("100%% %ts").parts[0] == "100% "


# -- the config keys -----------------------------------------------------------------------------


def settings(audit: dict[str, Any], tmp_path: Path) -> Settings:
    return settings_from_mapping({"audit": audit}, file="outgate.yaml", base_dir=tmp_path)


def test_json_stays_the_default_and_squid_options_are_validated(tmp_path: Path) -> None:
    default = settings({}, tmp_path)
    assert (default.audit_format, default.audit_squid_output) == ("json", "stdout")
    assert default.audit_squid_logformat == "squid"
    relative = settings({"format": "both", "squidOutput": "logs/access.log"}, tmp_path)
    assert relative.audit_squid_output == str(tmp_path / "logs/access.log")
    with pytest.raises(ConfigError) as both_on_stdout:
        settings({"format": "both"}, tmp_path)
    assert both_on_stdout.value.issues[0].path == "audit.squidOutput"
    with pytest.raises(ConfigError) as bad_format:
        settings({"format": "xml", "squidLogformat": "%ts %zz"}, tmp_path)
    assert {issue.path for issue in bad_format.value.issues} == {
        "audit.format",
        "audit.squidLogformat",
    }
    assert "%zz" in str(bad_format.value)


# -- the sink ------------------------------------------------------------------------------------


def test_the_sink_writes_every_line_of_both_kinds_through_one_writer(tmp_path: Path) -> None:
    stdout_path, squid_path = tmp_path / "stdout", tmp_path / "access.log"
    stdout_fd = os.open(stdout_path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        sink = AuditSink(stdout_fd)
        sink.configure(settings({"format": "both", "squidOutput": str(squid_path)}, tmp_path))
        for number in range(2000):
            ex = exchange(path=f"/n/{number}", decided=True, destination_ip="10.0.0.1", status=200)
            sink.decision(ex)
            sink.close(ex, Reason.COMPLETED)
        sink.flush_and_stop()
    finally:
        os.close(stdout_fd)
    json_lines = stdout_path.read_text().splitlines()
    squid_lines = squid_path.read_text().splitlines()
    assert len(json_lines) == 4000 and all(line.startswith("{") for line in json_lines)
    assert [line.split()[6] for line in squid_lines] == [
        f"http://api.example.com/n/{number}" for number in range(2000)
    ]
    assert all(SQUID_NATIVE.match(line) for line in squid_lines)


def test_squid_format_alone_replaces_the_json_records(tmp_path: Path) -> None:
    stdout_path = tmp_path / "stdout"
    stdout_fd = os.open(stdout_path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        sink = AuditSink(stdout_fd)
        sink.configure(settings({"format": "squid"}, tmp_path))
        ex = exchange(decided=True, destination_ip="10.0.0.1", status=200)
        sink.decision(ex)
        sink.close(ex, Reason.COMPLETED)
        sink.flush_and_stop()
    finally:
        os.close(stdout_fd)
    (line,) = stdout_path.read_text().splitlines()
    assert SQUID_NATIVE.match(line)


def test_an_unwritable_squid_output_is_a_config_error(tmp_path: Path) -> None:
    sink = AuditSink(os.open(os.devnull, os.O_WRONLY))
    try:
        with pytest.raises(ConfigError) as caught:
            sink.configure(
                settings({"format": "squid", "squidOutput": "no/such/dir/access.log"}, tmp_path)
            )
        assert caught.value.issues[0].path == "audit.squidOutput"
    finally:
        sink.flush_and_stop()


def squid_numbers(path: Path) -> list[int]:
    """The request numbers (/n/<number>) of a Squid log's lines, in file order."""
    return [int(line.split()[6].rsplit("/", 1)[1]) for line in path.read_text().splitlines()]


def test_reopen_after_a_rename_loses_no_line_and_puts_none_in_the_old_file(
    tmp_path: Path,
) -> None:
    """logrotate's way: rename the file, then signal. Each reopen happens while the writer
    thread is busy with earlier lines; lines emitted before a reopen are in the renamed file,
    every later one in the new file, each exactly once."""
    live = tmp_path / "access.log"
    sink = AuditSink(os.open(os.devnull, os.O_WRONLY))
    sink.configure(settings({"format": "squid", "squidOutput": str(live)}, tmp_path))
    reopened_at: list[int] = []
    number = 0
    for rotation in range(1, 6):
        for _ in range(3000):
            ex = exchange(path=f"/n/{number}", decided=True, destination_ip="10.0.0.1", status=200)
            sink.close(ex, Reason.COMPLETED)
            number += 1
        live.rename(tmp_path / f"access.log.{rotation}")
        assert sink.reopen()
        reopened_at.append(number)
    for _ in range(500):
        ex = exchange(path=f"/n/{number}", decided=True, destination_ip="10.0.0.1", status=200)
        sink.close(ex, Reason.COMPLETED)
        number += 1
    sink.flush_and_stop()

    starts = [0, *reopened_at]
    files = [tmp_path / f"access.log.{rotation}" for rotation in range(1, 6)] + [live]
    for path, first, end in zip(files, starts, [*reopened_at, number], strict=True):
        assert squid_numbers(path) == list(range(first, end)), path.name
    # Only descriptors still in use stay open: the five replaced ones were closed.
    open_logs = [
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    ]
    assert not any("access.log" in target for target in open_logs)


def test_reopen_without_a_file_does_nothing_and_a_failed_reopen_keeps_writing(
    tmp_path: Path,
) -> None:
    stdout_only = AuditSink(os.open(os.devnull, os.O_WRONLY))
    stdout_only.configure(settings({"format": "squid"}, tmp_path))
    assert not stdout_only.reopen()
    stdout_only.flush_and_stop()

    logs = tmp_path / "logs"
    logs.mkdir()
    live = logs / "access.log"
    sink = AuditSink(os.open(os.devnull, os.O_WRONLY))
    sink.configure(settings({"format": "squid", "squidOutput": str(live)}, tmp_path))
    sink.close(exchange(path="/n/0", decided=True, status=200), Reason.COMPLETED)
    live.rename(tmp_path / "access.log.1")
    logs.rmdir()  # the directory is gone: the reopen cannot create the file
    assert not sink.reopen()
    sink.close(exchange(path="/n/1", decided=True, status=200), Reason.COMPLETED)
    sink.flush_and_stop()
    assert squid_numbers(tmp_path / "access.log.1") == [0, 1]


# -- a proxy started as the CLI does ---------------------------------------------------------------


def wait_lines(path: Path, count: int, timeout: float = 10.0) -> list[str]:
    """The file's lines once it has `count` of them (the writer thread appends them)."""

    def enough() -> list[str] | None:
        lines = path.read_text().splitlines() if path.exists() else []
        return lines if len(lines) >= count else None

    return wait_for(enough, timeout, what=f"{path} to have {count} lines")


def test_squid_lines_of_allowed_and_denied_requests_parse_with_the_native_layout(
    start_proxy: StartProxy,
    origin: OriginServer,
    tls_origin: OriginServer,
    pki: OriginPKI,
    dns_server: ScriptedDNSServer,
) -> None:
    dns_server.addresses("origin.test", "127.0.0.1")
    proxy = start_proxy(
        policy_allowing("origin.test"),
        nameserver=dns_server.nameserver,
        config={"audit": {"format": "both", "squidOutput": "access.log"}},
    )
    allowed = curl("-x", proxy.url, f"http://origin.test:{origin.port}/hello?token=secret")
    assert allowed.stdout == "hello from origin\n", allowed.stderr
    denied = curl("-x", proxy.url, "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://blocked.test:{origin.port}/nope")  # fmt: skip
    assert denied.stdout == "403"
    tunnel = curl("-x", proxy.url, "--cacert", str(pki.ca_pem),
                  f"https://origin.test:{tls_origin.port}/hello")  # fmt: skip
    assert tunnel.stdout == "hello from origin\n", tunnel.stderr

    lines = wait_lines(proxy.workdir / "access.log", 3)
    parsed = [SQUID_NATIVE.match(line) for line in lines]
    assert all(parsed), lines
    by_url = {fields["url"]: fields for fields in parsed if fields is not None}

    ok = by_url[f"http://origin.test:{origin.port}/hello"]  # the query is not logged
    assert (ok["client"], ok["code"], ok["status"], ok["method"]) == (
        "127.0.0.1", "TCP_MISS", "200", "GET",
    )  # fmt: skip
    assert (ok["hierarchy"], ok["peer"], ok["user"], ok["type"]) == (
        "HIER_DIRECT", "127.0.0.1", "-", "-",
    )  # fmt: skip
    assert int(ok["bytes"]) == len("hello from origin\n")
    assert abs(float(ok["time"]) - time.time()) < 3600  # epoch seconds, not a monotonic clock

    refused = by_url[f"http://blocked.test:{origin.port}/nope"]
    assert (refused["code"], refused["status"], refused["bytes"]) == ("TCP_DENIED", "403", "0")
    assert (refused["hierarchy"], refused["peer"], refused["method"]) == ("HIER_NONE", "-", "GET")

    tunnelled = by_url[f"origin.test:{tls_origin.port}"]
    assert (tunnelled["code"], tunnelled["status"], tunnelled["method"]) == (
        "TCP_TUNNEL", "200", "CONNECT",
    )  # fmt: skip
    assert int(tunnelled["bytes"]) > 0

    # JSON records are still written beside the Squid lines: one decision and one close each.
    decision, close = proxy.records_by_path("/hello?token=secret")
    assert decision["outgate"]["decision"] == "allow"
    assert close["destination"]["bytes"] == int(ok["bytes"])


def test_squid_format_alone_writes_no_json_records(
    start_proxy: StartProxy, origin: OriginServer, dns_server: ScriptedDNSServer
) -> None:
    dns_server.addresses("origin.test", "127.0.0.1")
    proxy = start_proxy(
        policy_allowing("origin.test"),
        nameserver=dns_server.nameserver,
        config={"audit": {"format": "squid", "squidOutput": "access.log"}},
    )
    assert curl("-x", proxy.url, f"http://origin.test:{origin.port}/hello").returncode == 0
    (line,) = wait_lines(proxy.workdir / "access.log", 1)
    assert SQUID_NATIVE.match(line)
    proxy.stop()  # flushes the audit writer: anything it would write is written by now
    assert proxy.raw_stdout == []


def test_sigusr1_reopens_the_squid_log_in_every_worker(
    start_proxy: StartProxy, origin: OriginServer, dns_server: ScriptedDNSServer
) -> None:
    dns_server.addresses("origin.test", "127.0.0.1")
    proxy = start_proxy(
        policy_allowing("origin.test"),
        nameserver=dns_server.nameserver,
        config={"workers": 2, "audit": {"format": "both", "squidOutput": "access.log"}},
    )
    live, rotated = proxy.workdir / "access.log", proxy.workdir / "access.log.1"
    for number in range(20):
        assert curl("-x", proxy.url, f"http://origin.test:{origin.port}/hello?n={number}").stdout
    wait_lines(live, 20)
    live.rename(rotated)
    proxy.signal(signal.SIGUSR1)
    wait_for(
        lambda: sum(e.get("event") == "audit_files_reopened" for e in proxy.logs) == 2,
        what="both workers reopened the file",
    )
    for number in range(20, 40):
        assert curl("-x", proxy.url, f"http://origin.test:{origin.port}/hello?n={number}").stdout
    after = wait_lines(live, 20)
    assert len(rotated.read_text().splitlines()) == 20
    assert len(after) == 20
    assert proxy.stop() == 0
    closes = [r for r in proxy.records if r["event"]["action"] == "close"]
    assert len(closes) == 40
