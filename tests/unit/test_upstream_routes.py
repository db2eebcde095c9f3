"""Upstreams and routes (issue 12) without sockets: the config that defines them, the route
table that picks the way out, the Router's step 6, the parent's health, and what explain says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import settings_from_mapping
from proxy.core.addresses import AddressGuard
from proxy.core.hosts import parse_host
from proxy.core.http1 import parse_request_head, render_request_head
from proxy.core.identity import StaticIdentityIndex, parse_static_identities
from proxy.core.upstreams import ResolveMode, RouteTable
from proxy.dataplane.router import Router
from proxy.dataplane.upstream import ProxyHealth
from proxy.errors import ConfigError
from proxy.explainer import explain, explain_route
from tests.support.inprocess import FakeResolver
from tests.unit.test_router import (
    ALLOW_ANY_IP,
    ALLOW_API,
    ALLOW_WILD,
    CLIENT,
    Store,
    engine,
    ips,
    policy,
)

UPSTREAMS = [
    {"name": "corp", "proxies": ["http://squid.corp.example:3128"]},
    {"name": "split", "proxies": ["https://10.1.2.3:3129"], "resolve": "parent"},
]
ROUTES = {
    "default": "corp",
    "rules": [
        {"to": [{"fqdn": "*.internal"}, {"cidr": "10.0.0.0/8"}], "via": "direct"},
        {"to": [{"fqdn": "*.split.example"}], "via": "split"},
        {"to": [{"fqdn": "api.example.com"}], "via": "corp"},
    ],
}


def table(
    routes: dict[str, Any] = ROUTES, upstreams: list[dict[str, Any]] = UPSTREAMS
) -> RouteTable:
    settings = settings_from_mapping(
        {"upstreams": upstreams, "routes": routes},
        file="outgate.yaml",
        base_dir=Path("/etc/outgate"),
    )
    assert settings.routes is not None
    return settings.routes


def issues(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(raw, file="outgate.yaml", base_dir=Path("/etc/outgate"))
    return [f"{issue.path}: {issue.message} -- {issue.fix}" for issue in caught.value.issues]


# -- config ---------------------------------------------------------------------------------------


def test_an_upstream_is_read_with_every_setting_and_its_defaults() -> None:
    settings = settings_from_mapping(
        {
            "upstreams": [
                {
                    "name": "corp",
                    "proxies": ["http://a.corp.example:3128", "https://[fd00::1]:3129"],
                    "credentialsFile": "secrets/corp",
                    "caBundle": "/etc/ssl/corp.pem",
                    "failLimit": 5,
                    "retryAfter": "1m",
                    "responseTimeout": "45s",
                }
            ]
        },
        file="outgate.yaml",
        base_dir=Path("/etc/outgate"),
    )
    (spec,) = settings.upstreams
    assert [p.url for p in spec.proxies] == ["http://a.corp.example:3128", "https://[fd00::1]:3129"]
    assert spec.credentials_file == "/etc/outgate/secrets/corp"  # relative to the config file
    assert (spec.fail_limit, spec.retry_after, spec.response_timeout) == (5, 60.0, 45.0)
    assert (spec.connect_timeout, spec.resolve) == (10.0, ResolveMode.LOCAL)
    # Upstreams without routes route nothing: everything stays direct.
    assert settings.routes == RouteTable(default="direct")


def test_no_upstreams_means_no_routing_at_all() -> None:
    settings = settings_from_mapping({}, file="outgate.yaml", base_dir=Path("."))
    assert settings.upstreams == () and settings.routes is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"upstreams": [{"name": "corp", "proxies": ["http://user:pw@proxy:3128"]}]},
            "upstreams[0].proxies[0]: the URL carries credentials; put user:password in "
            "credentialsFile instead",
        ),
        (
            {"upstreams": [{"name": "corp", "proxies": ["socks5://proxy:1080"]}]},
            "upstreams[0].proxies[0]: scheme 'socks5' is not http or https",
        ),
        (
            {"upstreams": [{"name": "corp", "proxies": ["http://proxy"]}]},
            "upstreams[0].proxies[0]: the port is required",
        ),
        ({"upstreams": [{"name": "corp"}]}, "upstreams[0].proxies: proxies is missing or empty"),
        (
            {"upstreams": [{"name": "direct", "proxies": ["http://p:1"]}]},
            "upstreams[0].name: invalid upstream name 'direct' (direct means no upstream)",
        ),
        (
            {"upstreams": [{"name": "corp", "proxies": ["http://p:1"], "resolve": "remote"}]},
            "upstreams[0].resolve: invalid value 'remote'",
        ),
        (
            {"upstreams": [{"name": "corp", "proxies": ["http://p:1"], "failLimt": 3}]},
            "upstreams[0].failLimt: unknown key 'failLimt' -- did you mean 'failLimit'?",
        ),
        (
            {
                "upstreams": [{"name": "corp", "proxies": ["http://p:1"]}],
                "routes": {"default": "crop"},
            },
            "routes.default: 'crop' is neither direct nor an upstream's name -- use one of: "
            "direct, corp",
        ),
        (
            {"routes": {"rules": [{"to": [{"fqdn": "*"}], "via": "direct"}]}},
            "routes.rules[0].to[0].fqdn: a bare * would match every name",
        ),
        (
            {"routes": {"rules": [{"to": [{"cidr": "10.1.0.0/8"}], "via": "direct"}]}},
            "routes.rules[0].to[0].cidr:",
        ),
    ],
)
def test_a_bad_upstream_or_route_names_the_field_and_the_fix(
    raw: dict[str, Any], expected: str
) -> None:
    found = issues(raw)
    assert any(issue.startswith(expected) for issue in found), found


def test_a_config_error_never_repeats_a_url_carrying_credentials() -> None:
    found = issues({"upstreams": [{"name": "corp", "proxies": ["http://user:hunter2@proxy:3128"]}]})
    assert found and not [issue for issue in found if "hunter2" in issue]


# -- the route table ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "addresses", "expected"),
    [
        ("api.example.com", ("93.184.216.34",), "corp"),  # a rule by name
        ("www.example.com", ("93.184.216.34",), "corp"),  # no rule: the default
        ("db.internal", None, "direct"),  # a wildcard names any depth under the suffix
        ("a.b.internal", None, "direct"),
        ("internal", None, "corp"),  # never the suffix itself
        ("10.1.2.3", None, "direct"),  # a literal inside a cidr
        ("8.8.8.8", None, "corp"),
        ("intranet.example.com", ("10.9.9.9",), "direct"),  # a resolved address in a cidr
        ("intranet.example.com", ("93.184.216.34", "10.9.9.9"), "direct"),  # any of them
        ("app.split.example", None, "split"),
        ("API.Example.COM.", ("93.184.216.34",), "corp"),  # normalised like policy names
    ],
)
def test_the_first_matching_route_decides(
    host: str, addresses: tuple[str, ...] | None, expected: str
) -> None:
    parsed = parse_host(host)
    answer = None if addresses is None else ips(*addresses)
    assert table().select(parsed, 443, answer) == expected


def test_only_names_routed_to_a_resolve_parent_upstream_skip_local_dns() -> None:
    routes = table()
    assert routes.resolves_at_parent(parse_host("app.split.example"), 443) == "split"
    assert routes.resolves_at_parent(parse_host("api.example.com"), 443) is None
    assert routes.resolves_at_parent(parse_host("10.1.2.3"), 443) is None  # literals: never


# -- the router's step 6 --------------------------------------------------------------------------


def router(text: str, answers: dict[str, Any]) -> tuple[Router, FakeResolver]:
    resolver = FakeResolver(answers=answers)
    store = Store(engine(text))
    return (
        Router(policy=store, resolver=resolver, guard=AddressGuard(), routes=table()),  # type: ignore[arg-type]
        resolver,
    )


async def test_an_allowed_route_carries_its_way_out_and_a_denied_one_none() -> None:
    r, _ = router(policy(ALLOW_API), {"api.example.com": ips("93.184.216.34")})
    allowed = await r.route(CLIENT, parse_host("api.example.com"), 443)
    denied = await r.route(CLIENT, parse_host("www.example.com"), 443)
    assert (allowed.via, allowed.permitted, allowed.refusal()) == (
        "corp",
        ips("93.184.216.34"),
        None,
    )
    assert denied.via is None and denied.refusal() is not None


async def test_a_resolve_parent_route_makes_no_dns_query_and_is_allowed_without_addresses() -> None:
    r, resolver = router(
        policy("{name: split, action: Allow, to: [{fqdn: '*.split.example'}]}"), {}
    )
    route = await r.route(CLIENT, parse_host("app.split.example"), 443)
    assert (route.via, route.parent_resolves, route.permitted) == ("split", True, ())
    assert route.refusal() is None
    assert resolver.asked == []
    # A new policy revision re-decides it by name, still without a query.
    assert r.recheck(route) is route


async def test_a_guarded_address_is_refused_before_any_routing() -> None:
    r, _ = router(policy(ALLOW_WILD), {"leak.example.com": ips("169.254.169.254")})
    route = await r.route(CLIENT, parse_host("leak.example.com"), 443)
    assert route.permitted == () and route.refusal() is not None
    assert route.refusal().reason == "guarded_address"  # type: ignore[union-attr]


async def test_explain_shows_the_way_out() -> None:
    r, _ = router(policy(ALLOW_API, ALLOW_ANY_IP), {"api.example.com": ips("93.184.216.34")})
    identity = StaticIdentityIndex(
        parse_static_identities(
            [
                {
                    "name": "client",
                    "namespace": "tests",
                    "cidrs": ["127.0.0.1/32"],
                    "labels": {"app": "client"},
                }
            ],
            file="t",
            path="identity.static",
        )
    )
    text, data = await explain_route(
        r, identity, source="127.0.0.1", url="https://api.example.com/"
    )
    assert "route:       via upstream corp" in text
    assert data["route"]["upstream"] == {"name": "corp", "resolve": "local"}
    by_name, by_name_data = explain(r, identity, source="127.0.0.1", url="https://1.1.1.1/")
    assert "route:       via upstream corp" in by_name
    assert by_name_data["upstream"] == {"name": "corp", "final": True}


# -- health ---------------------------------------------------------------------------------------


def test_a_parent_is_down_after_fail_limit_failures_and_retried_after_retry_after() -> None:
    health = ProxyHealth(fail_limit=2, retry_after=10.0)
    assert health.available(0.0)
    assert health.failed(1.0) is False and health.available(1.0)
    assert health.failed(2.0) is True
    assert not health.available(11.9)
    assert health.available(12.0)  # retried once retryAfter has passed
    assert health.failed(12.0) is True and not health.available(21.9)  # failed again: down again
    health.succeeded()
    assert health.available(13.0) and health.failures == 0


# -- absolute form --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_line", "expected"),
    [
        (
            b"GET http://api.example.com/a?b=1 HTTP/1.1",
            b"GET http://api.example.com/a?b=1 HTTP/1.1",
        ),
        (b"GET http://api.example.com:8080 HTTP/1.1", b"GET http://api.example.com:8080/ HTTP/1.1"),
        (b"OPTIONS http://api.example.com HTTP/1.1", b"OPTIONS http://api.example.com HTTP/1.1"),
        (b"GET http://[2001:db8::1]:81/x HTTP/1.1", b"GET http://[2001:db8::1]:81/x HTTP/1.1"),
    ],
)
def test_a_request_to_a_parent_is_rendered_in_absolute_form_with_its_credentials(
    request_line: bytes, expected: bytes
) -> None:
    head = request_line + b"\r\nHost: x\r\nProxy-Authorization: Basic Y2xpZW50\r\n\r\n"
    req = parse_request_head(head)
    auth = b"Proxy-Authorization: Basic cGFyZW50\r\n"
    rendered = render_request_head(req, absolute=True, extra_fields=auth)
    assert rendered.split(b"\r\n")[0] == expected
    assert auth in rendered and b"Y2xpZW50" not in rendered
