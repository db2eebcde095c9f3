"""Basic proxy authentication for non-pod sources (issue 14, item 11), in-process with real
sockets, a real origin and real clients (curl, urllib).

The test client (127.0.0.1) is in `auth.basic.sources`; its users map to static identities with
no CIDRs of their own: `alice` to ci/build-vm, which may reach the origin, `bob` to ci/locked,
which may not.
"""

from __future__ import annotations

import asyncio
import ipaddress
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config import BasicAuth
from proxy.core.identity import Workload, WorkloadKind
from proxy.dataplane.proxy_auth import LoginScope
from tests.support.clients import curl
from tests.support.fixtures import policy_allowing
from tests.support.htpasswd import proxy_authorization, write_password_file
from tests.support.inprocess import (
    LOOPBACK,
    STATIC_CLIENT,
    Harness,
    closes,
    http_exchange,
    inprocess_proxy,
)
from tests.support.origin import OriginServer

PASSWORDS = {"alice": "correct horse battery", "bob": "bob's secret 42"}
USERS = {"alice": {"identity": "build-vm"}, "bob": {"identity": "ci/locked"}}
IDENTITIES = [
    STATIC_CLIENT,
    {"name": "build-vm", "namespace": "ci", "cidrs": [], "labels": {"app": "build"}},
    {"name": "locked", "namespace": "ci", "cidrs": [], "labels": {"app": "locked"}},
]
POLICY = policy_allowing(
    "origin.test", name="ci", namespace="ci", pod_selector="{matchLabels: {app: build}}"
)


def get(port: int, *, credentials: str = "", path: str = "/hello") -> bytes:
    return (
        f"GET http://origin.test:{port}{path} HTTP/1.1\r\nHost: origin.test:{port}\r\n"
        f"{credentials}\r\n"
    ).encode()


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[Harness]:
    file = write_password_file(tmp_path / "htpasswd", PASSWORDS)
    async with inprocess_proxy(
        tmp_path,
        POLICY,
        answers={"origin.test": LOOPBACK},
        identity={"static": IDENTITIES},
        auth={
            "basic": {
                "file": str(file),
                "realm": "Outgate egress",
                "sources": ["127.0.0.1/32"],
                "users": USERS,
            }
        },
    ) as harness:
        yield harness


async def exchange(harness: Harness, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(*harness.address)
    try:
        return await http_exchange(reader, writer, request)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("credentials", "reason"),
    [
        ("", "auth_required"),
        (proxy_authorization("alice", "wrong"), "auth_failed"),
        (proxy_authorization("mallory", "correct horse battery"), "auth_failed"),
        ("Proxy-Authorization: Bearer abc\r\n", "auth_required"),
        ("Proxy-Authorization: Basic !!notbase64\r\n", "auth_required"),
    ],
    ids=["none", "wrong-password", "unknown-user", "other-scheme", "garbled"],
)
async def test_missing_or_wrong_credentials_get_407_with_the_challenge(
    proxy: Harness, origin: OriginServer, credentials: str, reason: str
) -> None:
    status, headers, body = await exchange(proxy, get(origin.port, credentials=credentials))
    assert status == 407
    assert headers["proxy-authenticate"] == 'Basic realm="Outgate egress", charset="UTF-8"'
    assert headers["x-outgate-reason"] == reason
    records = await proxy.audit.wait_for(lambda r: True, count=2)
    assert [r["event"]["action"] for r in records] == ["decision", "close"]
    for record in records:
        assert record["outgate"]["reason"] == reason
        assert record["http"]["response"]["status_code"] == 407
        assert "user" not in record
    assert origin.seen == []
    assert b"correct horse" not in body


@pytest.mark.parametrize(
    ("user", "status", "workload", "reason"),
    [
        ("alice", 200, "Static/build-vm", "rule_allow"),
        ("bob", 403, "Static/locked", "default_deny"),
    ],
)
async def test_right_credentials_get_the_mapped_identitys_decision(
    proxy: Harness, origin: OriginServer, user: str, status: int, workload: str, reason: str
) -> None:
    credentials = proxy_authorization(user, PASSWORDS[user])
    got, _, _ = await exchange(proxy, get(origin.port, credentials=credentials))
    assert got == status
    (close,) = await proxy.audit.wait_for(closes)
    for record in proxy.audit.records:
        assert record["user"] == {"name": user}
        assert record["outgate"]["workload"] == workload
        assert record["source"]["ip"] == "127.0.0.1"
    decision = proxy.audit.records[0]
    assert decision["outgate"]["reason"] == reason
    if status == 200:
        (seen,) = origin.seen
        assert seen.header("Proxy-Authorization") is None  # never forwarded upstream
        assert close["outgate"]["reason"] == "completed"


async def test_keep_alive_requests_each_authenticate(proxy: Harness, origin: OriginServer) -> None:
    reader, writer = await asyncio.open_connection(*proxy.address)
    good = proxy_authorization("alice", PASSWORDS["alice"])
    for credentials, status in ((good, 200), ("", 407), (good, 200)):
        got, _, _ = await http_exchange(reader, writer, get(origin.port, credentials=credentials))
        assert got == status
    writer.close()
    records = await proxy.audit.wait_for(closes, count=3)
    assert [r.get("user", {}).get("name") for r in records] == ["alice", None, "alice"]


async def test_curl_with_proxy_user_is_served_as_its_identity(
    proxy: Harness, origin: OriginServer
) -> None:
    proxy_url = f"http://127.0.0.1:{proxy.address[1]}"
    url = f"http://origin.test:{origin.port}/hello"
    # curl resolves nothing itself through a proxy; it sends the credentials with the request.
    result = await asyncio.to_thread(
        curl, "-x", proxy_url, "--proxy-user", f"alice:{PASSWORDS['alice']}", "-i", url
    )
    assert result.stdout.startswith("HTTP/1.1 200"), result
    denied = await asyncio.to_thread(curl, "-x", proxy_url, "-i", url)
    assert denied.stdout.startswith("HTTP/1.1 407")
    assert 'Proxy-Authenticate: Basic realm="Outgate egress"' in denied.stdout


def _urllib_get(proxy_port: int, url: str, user: str, password: str) -> int:
    """urllib with ProxyBasicAuthHandler: it sends credentials only after a 407 challenge, as
    the JVM and .NET do."""
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    auth = urllib.request.ProxyBasicAuthHandler()
    auth.add_password("Outgate egress", proxy_url, user, password)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy_url}), auth)
    try:
        with opener.open(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        return error.code


async def test_a_client_that_answers_the_challenge_is_served(
    proxy: Harness, origin: OriginServer
) -> None:
    url = f"http://origin.test:{origin.port}/hello"
    status = await asyncio.to_thread(
        _urllib_get, proxy.address[1], url, "alice", PASSWORDS["alice"]
    )
    assert status == 200
    records = await proxy.audit.wait_for(closes, count=2)
    # First the bare request and its 407, then the retry with credentials.
    assert [r["outgate"]["reason"] for r in records] == ["auth_required", "completed"]
    assert records[1]["user"] == {"name": "alice"}


def test_pods_never_authenticate() -> None:
    scope = LoginScope(
        BasicAuth(
            file=Path("/nonexistent"),
            realm="r",
            sources=(ipaddress.ip_network("10.0.0.0/8"),),
            users={},
        )
    )
    inside = ipaddress.ip_address("10.1.2.3")
    assert scope.applies(inside, Workload(kind=WorkloadKind.UNKNOWN))
    assert scope.applies(inside, Workload(kind=WorkloadKind.STATIC, namespace="a", name="b"))
    assert not scope.applies(inside, Workload(kind=WorkloadKind.POD, namespace="a", name="p"))
    assert not scope.applies(inside, Workload(kind=WorkloadKind.AMBIGUOUS))
    assert not scope.applies(ipaddress.ip_address("192.0.2.1"), Workload(kind=WorkloadKind.UNKNOWN))
