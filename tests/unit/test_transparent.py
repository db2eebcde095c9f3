"""Transparent mode's pure parts and settings, as tables: the `transparent` config (defaults,
errors with path and fix), the destination a ClientHello names (`sni_destination`), the port of
a request on the HTTP listener, and the original destination of a socket nothing redirected."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Endpoint, Settings, settings_from_mapping
from proxy.core.clienthello import ClientHello
from proxy.core.hosts import Host
from proxy.core.http1 import RequestForm, parse_request_head
from proxy.core.tunnel_protocols import sni_destination
from proxy.dataplane.transparent import (
    ListenerKind,
    origin_form_port,
    original_destination,
    transparent_listeners,
)
from proxy.errors import ConfigError, Reason, TunnelViolation


def _settings(transparent: Any, **more: Any) -> Settings:
    return settings_from_mapping(
        {"transparent": transparent, **more}, file="outgate.yaml", base_dir=Path(".")
    )


def _issues(transparent: Any, **more: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        _settings(transparent, **more)
    return [(issue.path, issue.fix) for issue in caught.value.issues]


# -- config -------------------------------------------------------------------------------------
def test_every_listener_is_off_by_default() -> None:
    transparent = settings_from_mapping({}, file="x", base_dir=Path(".")).transparent
    assert (transparent.tls, transparent.http, transparent.ports) == (None, None, ())
    assert (transparent.tls_port, transparent.http_port) == (443, 80)
    assert transparent_listeners(transparent) == ()


def test_the_listeners_in_order_with_their_ports() -> None:
    settings = _settings(
        {
            "tls": "0.0.0.0:8443",
            "tlsPort": 9443,
            "http": "[::]:8080",
            "ports": [{"listen": "0.0.0.0:15432", "to": "ledger.db.corp.example:5432"}],
        }
    )
    assert settings.transparent.tls == Endpoint(host="0.0.0.0", port=8443)
    tls, http, mapped = transparent_listeners(settings.transparent)
    assert (tls.kind, tls.bind_port, tls.port) == (ListenerKind.TLS, 8443, 9443)
    assert (http.kind, http.host, http.port) == (ListenerKind.HTTP, "::", 80)
    assert (mapped.kind, mapped.bind_port, mapped.port) == (ListenerKind.PORT_MAP, 15432, 5432)
    assert mapped.to == Host(name="ledger.db.corp.example")
    assert mapped.name == "port-map 0.0.0.0:15432"


@pytest.mark.parametrize(
    ("transparent", "path", "fix_says"),
    [
        ({"tsl": "0.0.0.0:8443"}, "transparent.tsl", "did you mean 'tls'"),
        ({"tls": "api.example:8443"}, "transparent.tls", "address:port"),
        ({"tlsPort": 0}, "transparent.tlsPort", "a port"),
        ({"httpPort": "eighty"}, "transparent.httpPort", "a port"),
        ({"ports": {"listen": "0.0.0.0:1"}}, "transparent.ports", "ports: [{listen:"),
        ({"ports": [{"listen": "0.0.0.0:1"}]}, "transparent.ports[0].to", "a host name or IP"),
        ({"ports": [{"to": "db:5432"}]}, "transparent.ports[0].listen", "listen:"),
        ({"ports": [{"listen": "0.0.0.0:1", "to": "db"}]}, "transparent.ports[0].to", "and a port"),
        (
            {"ports": [{"listen": "0.0.0.0:1", "to": "db:5432", "mode": "x"}]},
            "transparent.ports[0].mode",
            "valid keys here: listen, to",
        ),
        ({"tls": "127.0.0.1:3128"}, "transparent.tls", "its own address:port"),
        (
            {"tls": "0.0.0.0:8443", "ports": [{"listen": "0.0.0.0:8443", "to": "db:5432"}]},
            "transparent.ports[0].listen",
            "its own address:port",
        ),
    ],
)
def test_a_bad_transparent_config_names_the_field_and_the_fix(
    transparent: Any, path: str, fix_says: str
) -> None:
    issues = _issues(transparent)
    assert [p for p, _ in issues] == [path]
    assert fix_says in issues[0][1]


def test_a_transparent_listener_needs_a_fixed_port_with_several_workers() -> None:
    issues = _issues({"tls": "0.0.0.0:0"}, workers=2)
    assert issues == [("transparent.tls", "give a fixed port")]
    assert _settings({"tls": "0.0.0.0:0"}).transparent.tls == Endpoint(host="0.0.0.0", port=0)


# -- the destination a ClientHello names -------------------------------------------------------
def _hello(server_name: str | None, *, ech: bool = False, esni: bool = False) -> ClientHello:
    return ClientHello(
        server_name=server_name,
        alpn=(),
        ech=ech,
        esni=esni,
        legacy_version=0x0303,
        size=100,
        records=1,
    )


@pytest.mark.parametrize(
    ("hello", "expected"),
    [
        (_hello("api.example.com"), Host(name="api.example.com")),
        (_hello("API.Example.COM."), Host(name="api.example.com")),
        (_hello("bücher.example"), Host(name="xn--bcher-kva.example")),
        (_hello(None), Reason.SNI_MISSING),
        (_hello("11.0.0.5"), Reason.SNI_IP_LITERAL),
        (_hello("[2001:db8::1]"), Reason.SNI_IP_LITERAL),
        (_hello("0x7f.1"), Reason.SNI_IP_LITERAL),
        (_hello("api.example.com", ech=True), Reason.ECH_DENIED),
        (_hello("public.example", esni=True), Reason.ECH_DENIED),
        (_hello("bad name.example"), Reason.CLIENTHELLO_MALFORMED),
    ],
)
def test_the_sni_is_the_destination_and_is_required(
    hello: ClientHello, expected: Host | Reason
) -> None:
    if isinstance(expected, Host):
        assert sni_destination(hello) == expected
    else:
        with pytest.raises(TunnelViolation) as caught:
            sni_destination(hello)
        assert caught.value.reason is expected


# -- the HTTP listener's port -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("head", "fallback", "port"),
    [
        (b"GET / HTTP/1.1\r\nHost: api.example\r\n\r\n", 8080, 8080),  # original destination's
        (b"GET / HTTP/1.1\r\nHost: api.example:81\r\n\r\n", 8080, 81),
        (b"GET / HTTP/1.1\r\nHost: api.example:80\r\n\r\n", 8080, 80),
        (b"GET http://api.example/ HTTP/1.1\r\nHost: api.example\r\n\r\n", 8080, 80),
        (b"GET http://api.example:82/ HTTP/1.1\r\nHost: x\r\n\r\n", 8080, 82),
    ],
)
def test_the_port_of_a_request_on_the_http_listener(head: bytes, fallback: int, port: int) -> None:
    req = parse_request_head(head, form=RequestForm.ORIGIN, authority=None)
    assert origin_form_port(req, fallback) == port


# -- SO_ORIGINAL_DST ----------------------------------------------------------------------------
def test_a_connection_nothing_redirected_has_no_original_destination() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()),
    ):
        accepted, _ = server.accept()
        with accepted:
            assert original_destination(accepted) is None
