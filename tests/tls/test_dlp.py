"""proxy.core.dlp: each detector fires on a planted secret (in every place and wrapping it can
hide in), names the field and never the secret, and stays quiet on ordinary requests."""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote, quote_plus

import pytest

from proxy.core.dlp import (
    BUILTIN_DETECTORS,
    CredentialHosts,
    CustomDetector,
    DlpConfig,
    DlpHit,
    merge_credential_hosts,
    parse_credential_hosts,
    parse_custom_detectors,
    scan_request,
)

ALL = tuple(sorted(BUILTIN_DETECTORS))
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
PEM = "-----BEGIN RSA PRIVATE KEY-----MIIEowIBAAKCAQEA7"
GITHUB = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
SLACK = "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
GCP = json.dumps({"type": "service_account", "private_key_id": "0123456789abcdef" * 2 + "01234567"})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(**claims: object) -> str:
    header = b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}.c2lnbmF0dXJl"


def scan(
    headers: list[tuple[str, str]] | None = None,
    target: str = "/",
    *,
    destination: str = "api.example.com",
    detectors: tuple[str, ...] = ALL,
    config: DlpConfig | None = None,
) -> DlpHit | None:
    return scan_request(
        headers=tuple(headers or [("Host", destination), ("Accept", "*/*")]),
        target=target,
        destination=destination,
        detectors=detectors,
        config=config or DlpConfig(),
    )


def scan_only(
    headers: list[tuple[str, str]], *, destination: str, config: DlpConfig | None = None
) -> DlpHit | None:
    """Only bearer-to-other-host: a GitHub token is also what github-token looks for."""
    return scan(
        headers, destination=destination, detectors=("bearer-to-other-host",), config=config
    )


PLANTED = [
    # (detector, headers, target, expected field)
    ("aws-access-key", [("X-Debug", f"key={AWS_KEY}")], "/", "header:x-debug"),
    ("aws-access-key", [], f"/upload?k={AWS_KEY}", "url.query"),
    ("aws-access-key", [], f"/keys/{AWS_KEY}/x", "url.path"),
    (
        "aws-access-key",
        [("X-Blob", base64.b64encode(f"id {AWS_KEY} ok".encode()).decode())],
        "/",
        "header:x-blob",
    ),
    ("aws-access-key", [(AWS_KEY, "1")], "/", "header-name[0]"),
    ("private-key", [("X-Key", PEM)], "/", "header:x-key"),
    ("private-key", [], "/?pem=" + quote_plus(PEM), "url.query"),
    ("private-key", [], "/?pem=" + quote(PEM), "url.query"),
    (
        "private-key",
        [("X-Key", base64.b64encode(PEM.encode() + b"\nMIIE").decode())],
        "/",
        "header:x-key",
    ),
    ("private-key", [("X-Key", "-----BEGIN OPENSSH PRIVATE KEY-----b3Blbn")], "/", "header:x-key"),
    ("private-key", [("X-Key", "-----BEGIN PGP PRIVATE KEY BLOCK-----")], "/", "header:x-key"),
    (
        "gcp-service-account-key",
        [("X-Creds", base64.b64encode(GCP.encode()).decode())],
        "/",
        "header:x-creds",
    ),
    ("gcp-service-account-key", [], "/?c=" + quote(GCP), "url.query"),
    ("github-token", [("X-Token", GITHUB)], "/", "header:x-token"),
    ("slack-token", [], f"/hook?t={SLACK}", "url.query"),
    ("bearer-to-other-host", [("Authorization", f"Bearer {GITHUB}")], "/", "header:authorization"),
    (
        "bearer-to-other-host",
        [
            (
                "Authorization",
                "Basic " + base64.b64encode(f"x-access-token:{GITHUB}".encode()).decode(),
            )
        ],
        "/",
        "header:authorization",
    ),
    (
        "bearer-to-other-host",
        [
            (
                "Authorization",
                "Bearer "
                + jwt(
                    aud="https://kubernetes.default.svc.cluster.local",
                    sub="system:serviceaccount:a:b",
                ),
            )
        ],
        "/",
        "header:authorization",
    ),
    (
        "bearer-to-other-host",
        [("X-Session", jwt(aud=["billing.example.net"]))],
        "/",
        "header:x-session",
    ),
    ("bearer-to-other-host", [], "/cb?id_token=" + jwt(aud="login.example.org"), "url.query"),
]


@pytest.mark.parametrize(("detector", "headers", "target", "field"), PLANTED)
def test_each_detector_fires_on_a_planted_secret_and_names_the_field(
    detector: str, headers: list[tuple[str, str]], target: str, field: str
) -> None:
    hit = scan([("Host", "api.example.com"), *headers], target, detectors=(detector,))
    assert hit == DlpHit(detector=detector, field=field.replace("[0]", "[1]"))


@pytest.mark.parametrize(("detector", "headers", "target", "field"), PLANTED)
def test_a_detector_the_rule_does_not_list_stays_quiet(
    detector: str, headers: list[tuple[str, str]], target: str, field: str
) -> None:
    others = tuple(d for d in ALL if d != detector)
    hit = scan([("Host", "api.example.com"), *headers], target, detectors=others)
    assert hit is None or hit.detector != detector


CLEAN = [
    (
        [("Authorization", "Bearer abc.def"), ("Cookie", "session=4f9a8b7c6d5e4f3a2b1c")],
        "/v2/items?page=2&sort=name",
    ),
    ([("User-Agent", "curl/8.5.0"), ("X-Request-Id", "0f8fad5b-d9cb-469f-a165-70867728950e")], "/"),
    (
        [
            ("Accept-Encoding", "gzip, deflate, br"),
            ("If-None-Match", '"33a64df551425fcc55e4d42a148795d9f25f89d4"'),
        ],
        "/assets/app.js",
    ),
    ([("Authorization", "Bearer " + jwt(aud="api.example.com", sub="me"))], "/"),
    ([("Authorization", "Bearer " + jwt(aud="https://api.example.com/v1"))], "/"),
    ([("Authorization", "Bearer " + jwt(aud="my-internal-api"))], "/"),  # not a host: not judged
    ([("Authorization", "Basic " + base64.b64encode(b"user:hunter2").decode())], "/"),
    (
        [("X-Data", base64.b64encode(b"just some ordinary data that is long enough").decode())],
        "/?q=hello+world",
    ),
]


@pytest.mark.parametrize(("headers", "target"), CLEAN)
def test_ordinary_requests_pass_every_detector(headers: list[tuple[str, str]], target: str) -> None:
    assert scan([("Host", "api.example.com"), *headers], target) is None


def test_a_credential_goes_where_it_was_issued_for() -> None:
    def scan(headers: list[tuple[str, str]], *, destination: str) -> DlpHit | None:
        return scan_only(headers, destination=destination)

    bearer = [("Authorization", f"Bearer {GITHUB}")]
    assert scan(bearer, destination="api.github.com") is None
    assert scan(bearer, destination="github.com") is None
    assert scan(bearer, destination="github.com.evil.example") is not None
    irsa = [("Authorization", "Bearer " + jwt(aud="sts.amazonaws.com"))]
    assert scan(irsa, destination="sts.us-east-1.amazonaws.com") is None
    assert scan(irsa, destination="attacker.example") is not None
    gke = [("Authorization", "Bearer " + jwt(aud="my-project.svc.id.goog"))]
    assert scan(gke, destination="sts.googleapis.com") is None


def test_operator_credential_hosts_add_to_and_replace_the_defaults() -> None:
    scan = scan_only
    ghe = parse_credential_hosts(
        [
            {"name": "github", "token": "^ghp_", "hosts": ["github.corp.example"]},
            {"name": "vault", "token": "^hvs\\.", "hosts": ["vault.corp.example"]},
        ]
    )
    config = DlpConfig(credential_hosts=merge_credential_hosts(ghe))
    assert (
        scan(
            [("Authorization", f"Bearer {GITHUB}")],
            destination="github.corp.example",
            config=config,
        )
        is None
    )
    assert (
        scan([("Authorization", f"Bearer {GITHUB}")], destination="api.github.com", config=config)
        is not None
    )
    vault = [("Authorization", "Bearer hvs.CAESIJ2")]
    assert scan(vault, destination="vault.corp.example", config=config) is None
    assert scan(vault, destination="api.example.com", config=config) is not None


def test_custom_detectors_on_header_names_values_and_the_query() -> None:
    custom = parse_custom_detectors(
        [
            {"name": "internal-header", "headerName": "(?i)^x-internal-"},
            {"name": "ticket-ids", "headerValue": "TICKET-[0-9]{6}"},
            {"name": "customer-email", "query": "[a-z]+@corp\\.example"},
        ]
    )
    config = DlpConfig(custom=custom)
    assert scan([("X-Internal-Trace", "1")], config=config, detectors=()) == DlpHit(
        detector="internal-header", field="header-name[0]"
    )
    assert scan([("X-Ref", "see TICKET-123456")], config=config, detectors=()) == DlpHit(
        detector="ticket-ids", field="header:x-ref"
    )
    assert scan([], "/s?who=alice%40corp.example", config=config, detectors=()) == DlpHit(
        detector="customer-email", field="url.query"
    )
    assert scan([("X-Ref", "TICKET-12")], "/s?who=bob", config=config, detectors=()) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("nope", "list"),
        ([{"name": "x"}], "no pattern"),
        ([{"name": "Bad_Name", "query": "a"}], "DNS-1123"),
        ([{"name": "x", "query": "("}], r"\[0\]\.query: RE2.*cannot run it \(missing \)"),
        ([{"name": "x", "headerValue": "(?<!x)key"}], "rewrite it without lookaround"),
        ([{"name": "x", "query": "(a)\\1"}], "backreferences"),
        ([{"name": "aws-access-key", "query": "a"}], "built-in"),
        ([{"name": "x", "query": "a", "color": "red"}], "unknown keys"),
        ([{"name": "x", "query": "a"}, {"name": "x", "query": "b"}], "twice"),
    ],
)
def test_bad_custom_detectors_are_refused_with_the_reason(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_custom_detectors(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([{"name": "x", "hosts": ["a.example"]}], "token or audiences"),
        ([{"name": "x", "token": "^a", "hosts": []}], "no hosts"),
        ([{"name": "x", "token": "^a", "hosts": ["a.*.example"]}], r"\*"),
        ([{"name": "x", "token": "^a", "hosts": "a.example"}], "list of strings"),
        ([{"name": "x", "token": "(?=a)", "hosts": ["a.example"]}], r"\[0\]\.token: RE2"),
    ],
)
def test_bad_credential_hosts_are_refused_with_the_reason(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_credential_hosts(raw)


def test_a_detector_hit_never_contains_the_secret() -> None:
    for detector, headers, target, _ in PLANTED:
        hit = scan([("Host", "api.example.com"), *headers], target, detectors=(detector,))
        assert hit is not None
        for secret in (AWS_KEY, GITHUB, SLACK, "PRIVATE KEY", "service_account"):
            assert secret not in hit.field


def test_custom_detector_needs_a_pattern() -> None:
    with pytest.raises(ValueError):
        CustomDetector(name="x")
    with pytest.raises(ValueError):
        CredentialHosts(name="x", hosts=("a.example",))
    assert re.compile("a")  # keeps the import honest for type checkers
