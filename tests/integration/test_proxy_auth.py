"""Proxy auth with Outgate started as the CLI starts it (issue 14, item 11): the password appears
in no output, and the password file is re-read when it changes."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.support.clients import curl
from tests.support.fixtures import policy_allowing
from tests.support.htpasswd import write_password_file
from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI
from tests.support.proxyproc import ProxyProcess, run_outgate
from tests.support.waiting import wait_for

StartProxy = Callable[..., ProxyProcess]

SECRET = "Tr0ub4dor&3-unique-secret"
WRONG = "guess-unique-wrong-secret"
POLICY = policy_allowing(name="ci", namespace="ci", pod_selector="{}")


def start(start_proxy: StartProxy, htpasswd: Path) -> ProxyProcess:
    return start_proxy(
        POLICY,
        config={
            "identity": {
                "static": [{"name": "build-vm", "namespace": "ci", "cidrs": []}],
            },
            "auth": {
                "basic": {
                    "file": str(htpasswd),
                    "sources": ["127.0.0.0/8"],
                    "users": {"alice": {"identity": "build-vm"}},
                }
            },
        },
    )


def status(proxy: ProxyProcess, url: str, *credentials: str) -> str:
    return curl("-x", proxy.url, *credentials, url, status_only=True).stdout


def test_the_password_appears_in_no_output(
    start_proxy: StartProxy, origin: OriginServer, tmp_path: Path
) -> None:
    proxy = start(start_proxy, write_password_file(tmp_path / "htpasswd", {"alice": SECRET}))
    url = f"http://127.0.0.1:{origin.port}/hello"
    bodies: list[str] = []
    for user, password in (("alice", SECRET), ("alice", WRONG), ("mallory", SECRET)):
        result = curl("-x", proxy.url, "--proxy-user", f"{user}:{password}", "-i", url)
        bodies.append(result.stdout)
    bodies.append(curl("-x", proxy.url, "-i", url).stdout)
    # A client answering the challenge (urllib sends credentials only after a 407).
    auth = urllib.request.ProxyBasicAuthHandler()
    auth.add_password("outgate", proxy.url, "alice", WRONG)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}), auth)
    try:
        opener.open(url, timeout=10).close()
    except urllib.error.HTTPError as error:
        bodies.append(error.read().decode())
        error.close()
    assert bodies[0].startswith("HTTP/1.1 200")
    assert all(body.startswith("HTTP/1.1 407") for body in bodies[1:4])
    proxy.wait_records(lambda r: r["event"]["action"] == "close", count=6)
    _, scrape = proxy.admin("/metrics")
    outputs = {
        "audit records (stdout)": b"".join(proxy.raw_stdout).decode(),
        "logs (stderr)": json.dumps(proxy.logs),
        "metrics": scrape,
        "replies": "\n".join(bodies),
    }
    for password in (SECRET, WRONG):
        for user in ("alice", "mallory"):
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            for where, text in outputs.items():
                assert password not in text, where
                assert token not in text, where
    assert '"user":{"name":"alice"}' in outputs["audit records (stdout)"]


def test_a_changed_password_file_is_read_again_and_a_bad_one_keeps_the_last_good(
    start_proxy: StartProxy, origin: OriginServer, tmp_path: Path
) -> None:
    htpasswd = write_password_file(tmp_path / "htpasswd", {"alice": "first password"})
    proxy = start(start_proxy, htpasswd)
    url = f"http://127.0.0.1:{origin.port}/hello"
    first = ("--proxy-user", "alice:first password")
    second = ("--proxy-user", "alice:second password")
    assert status(proxy, url, *first) == "200"
    # Replaced as a Secret volume is updated: written aside, renamed over.
    write_password_file(tmp_path / "staged", {"alice": "second password"}).rename(htpasswd)
    wait_for(lambda: status(proxy, url, *second) == "200", what="the new password accepted")
    assert status(proxy, url, *first) == "407"  # its remembered success went with the old file
    htpasswd.write_text("alice:$apr1$abc$0123456789abcdefghijkl\n")  # MD5: refused as a whole
    failed = proxy.wait_log(lambda e: e.get("event") == "proxy_auth_file_reload_failed")
    assert "only bcrypt" in failed["error"]
    assert "first password" not in json.dumps(failed)
    assert status(proxy, url, *second) == "200"


def test_a_tunnel_authenticates_on_its_connect(
    start_proxy: StartProxy, tls_origin: OriginServer, pki: OriginPKI, tmp_path: Path
) -> None:
    proxy = start(start_proxy, write_password_file(tmp_path / "htpasswd", {"alice": SECRET}))
    url = f"https://127.0.0.1:{tls_origin.port}/hello"
    ok = curl("-x", proxy.url, "--proxy-user", f"alice:{SECRET}", "--cacert", str(pki.ca_pem), url)
    assert ok.stdout == "hello from origin\n", ok
    refused = curl("-x", proxy.url, "--cacert", str(pki.ca_pem), url)
    assert "407" in refused.stderr, refused
    records = proxy.wait_records(lambda r: r["event"]["action"] == "close", count=2)
    assert [r.get("user", {}).get("name") for r in records] == ["alice", None]
    assert [r["outgate"]["connection"] for r in records] == ["tunnel", "tunnel"]
    assert records[1]["outgate"]["reason"] == "auth_required"


def test_check_config_loads_the_password_file_as_run_would(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    config = tmp_path / "outgate.yaml"
    config.write_text(
        "identity: {static: [{name: build-vm, namespace: ci, cidrs: []}]}\n"
        "auth: {basic: {file: htpasswd, sources: [10.8.0.0/16],"
        " users: {alice: {identity: build-vm}}}}\n"
    )
    write_password_file(htpasswd, {"alice": SECRET})
    assert run_outgate("check-config", str(config)).returncode == 0
    htpasswd.write_text("alice:$apr1$abc$0123456789abcdefghijkl\n")
    result = run_outgate("check-config", str(config))
    assert result.returncode == 1
    assert "auth.basic.file" in result.stderr and "only bcrypt" in result.stderr
    assert "htpasswd -B" in result.stderr


def test_explain_names_the_login_and_explains_a_users_decision(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    proxy = start(start_proxy, write_password_file(tmp_path / "htpasswd", {"alice": SECRET}))
    url = "http://127.0.0.1:8080/"
    status, text = proxy.admin(f"/explain?source=127.0.0.9&url={url}")
    assert status == 400 and "must log in" in text and "auth_required" in text
    status, text = proxy.admin(f"/explain?source=127.0.0.9&url={url}&user=alice&format=json")
    assert status == 200, text
    explained = json.loads(text)
    assert (explained["workload"]["namespace"], explained["workload"]["name"]) == (
        "ci",
        "build-vm",
    )
    assert proxy.admin(f"/explain?source=127.0.0.9&url={url}&user=mallory")[0] == 400
    # The command line explains the same way.
    cli = run_outgate(
        "explain", "--config", str(proxy.config_path), "--source", "127.0.0.9", "--url", url
    )
    assert cli.returncode != 0 and "must log in" in cli.stderr
    cli = run_outgate(
        "explain",
        "--config",
        str(proxy.config_path),
        "--source",
        "127.0.0.9",
        "--url",
        url,
        "--user",
        "alice",
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("workload:    ci/Static/build-vm")
