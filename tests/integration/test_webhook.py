"""`outgate webhook` as a process, spoken to as the API server speaks to it: AdmissionReview JSON
over HTTPS. Validation gives check-config's message; injection patches pods; bad, oversized and
slow requests get a clear status and never stop the server; a rotated certificate is served."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.jsonpatch import apply_patch
from tests.support.pki import make_pki
from tests.support.proxyproc import run_outgate
from tests.support.waiting import wait_for
from tests.support.webhook import WebhookProcess, admission_review, decoded_patch

INJECT = {
    "proxy": "outgate.outgate-system.svc.cluster.local:3128",
    "namespace": "outgate-system",
    "clusterCIDRs": ["10.96.0.0/12"],
}
PROXY_URL = "http://outgate.outgate-system.svc.cluster.local:3128"


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[WebhookProcess]:
    with WebhookProcess(tmp_path / "webhook", inject=INJECT, limits={"requestTimeout": "1s"}) as w:
        yield w


def egress(fqdn: str, name: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "outgate.dev/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": "shop", "uid": "u-1", "generation": 1},
        "spec": {"rules": [{"name": "r", "action": "Allow", "to": [{"fqdn": fqdn}]}]},
    }


def policy_review(obj: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    return {
        "kind": obj["kind"],
        "obj": obj,
        "operation": operation,
        "namespace": obj["metadata"].get("namespace", ""),
        "group": "outgate.dev",
    }


def test_a_bad_policy_is_refused_with_check_configs_field_path_and_fix(
    webhook: WebhookProcess, tmp_path: Path
) -> None:
    bad = egress("api.*.example.com")
    response = webhook.review("/validate-policies", policy_review(bad))
    assert response["allowed"] is False
    message = response["status"]["message"]
    assert message.startswith("EgressPolicy shop/web: spec.rules[0].to[0].fqdn:")
    # The same words check-config prints for the same document in a file.
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(bad))
    checked = run_outgate("check-config", str(path))
    assert checked.returncode != 0
    field_and_fix = message.split(": ", 1)[1]
    assert field_and_fix in checked.stderr
    assert "-- fix: write" in field_and_fix


def test_a_valid_policy_an_update_and_a_delete_are_allowed(webhook: WebhookProcess) -> None:
    good = egress("*.example.com")
    assert webhook.review("/validate-policies", policy_review(good))["allowed"] is True
    cluster = {
        "apiVersion": "outgate.dev/v1alpha1",
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": "base"},
        "spec": {
            "tier": "baseline",
            "rules": [{"name": "r", "action": "Deny", "to": [{"fqdn": "*"}]}],
        },
    }
    refused = webhook.review("/validate-policies", policy_review(cluster, "UPDATE"))
    assert refused["allowed"] is False
    assert (
        "ClusterEgressPolicy base: spec.rules[0].to[0].fqdn: a bare * would match"
        in (refused["status"]["message"])
    )
    # The namespace is the request's when the object leaves it out (as `kubectl apply -n` does).
    unplaced = egress("*.com")
    del unplaced["metadata"]["namespace"]
    refused = webhook.review("/validate-policies", {**policy_review(unplaced), "namespace": "shop"})
    assert refused["status"]["message"].startswith("EgressPolicy shop/web: spec.rules[0].to[0]")
    deleted = {**policy_review(good, "DELETE"), "obj": None}
    assert webhook.review("/validate-policies", deleted)["allowed"] is True


def test_a_pod_gets_the_proxy_settings_and_a_second_admission_adds_nothing(
    webhook: WebhookProcess,
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "api-", "namespace": "shop"},
        "spec": {
            "containers": [{"name": "app", "image": "app"}],
            "initContainers": [{"name": "setup", "image": "setup"}],
        },
    }
    response = webhook.review("/mutate-pods", {"kind": "Pod", "obj": pod, "namespace": "shop"})
    assert response["allowed"] is True
    patched = apply_patch(pod, decoded_patch(response))
    for container in patched["spec"]["containers"] + patched["spec"]["initContainers"]:
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["HTTPS_PROXY"] == env["http_proxy"] == PROXY_URL
        assert "10.96.0.0/12" in env["NO_PROXY"].split(",")
    again = webhook.review(
        "/mutate-pods", {"kind": "Pod", "obj": patched, "namespace": "shop", "dry_run": True}
    )
    assert again["allowed"] is True and "patch" not in again
    for namespace in ("kube-system", "outgate-system"):
        untouched = webhook.review(
            "/mutate-pods", {"kind": "Pod", "obj": pod, "namespace": namespace}
        )
        assert untouched["allowed"] is True and "patch" not in untouched


@contextlib.contextmanager
def tls_connection(
    webhook: WebhookProcess, context: ssl.SSLContext | None = None
) -> Iterator[ssl.SSLSocket]:
    context = context or webhook.client_context()
    raw = socket.create_connection(("127.0.0.1", webhook.port), timeout=10)
    with raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        yield tls


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def raw_exchange(webhook: WebhookProcess, data: bytes) -> bytes:
    """Send `data`, and read one answer: its head and the Content-Length bytes of its body."""
    with tls_connection(webhook) as tls:
        tls.sendall(data)
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
            head, found, body = reply.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
            if found and length and len(body) >= int(length.group(1)):
                break
        return reply


def status_and_error(reply: bytes) -> tuple[int, str]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def post(path: str, body: bytes, *, content_type: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: webhook\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    ("request_bytes", "status", "error"),
    [
        (post("/validate-policies", b"{not json"), 400, "the body is not JSON"),
        (post("/validate-policies", b"[]"), 400, "not a JSON object"),
        (post("/validate-policies", b'{"apiVersion": "v1", "kind": "Pod"}'), 400,
         "expected apiVersion admission.k8s.io/v1 and kind AdmissionReview"),
        (post("/validate-policies", json.dumps({"apiVersion": "admission.k8s.io/v1",
              "kind": "AdmissionReview", "request": {"uid": "1"}}).encode()), 400,
         "request.kind is missing"),
        (post("/mutate-pods", b"{}", content_type="text/plain"), 415, "application/json"),
        (post("/validate-policies", b"[" * 200000 + b"]" * 200000), 400, "nested too deeply"),
        (post("/validate-policies", json.dumps(admission_review(
            kind="EgressPolicy", group="outgate.dev", namespace="shop",
            obj={"metadata": {"name": "deep", "namespace": "shop"},
                 "spec": {"rules": [{"name": "r", "to": _nested(900)}]}})).encode()),
         500, "the review failed"),
        (post("/elsewhere", b"{}"), 404, "no webhook at '/elsewhere'"),
        (b"GET /validate-policies HTTP/1.1\r\nHost: w\r\n\r\n", 405, "takes POST"),
        (b"POST /validate-policies HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
         b"Content-Length: 2000000\r\n\r\n", 413, "the limit is 1048576"),
        (b"POST /mutate-pods HTTP/1.1\r\nHost: w\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
         400, "Content-Length"),
        (b"BREW /mutate-pods HTTP/1.1\r\nHost: w\r\n\r\n" + b"\x00" * 3, 405, "takes POST"),
        (b"GET / HTTP/1.1\r\nHost: w\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431,
         "head not complete"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_status_and_the_server_keeps_serving(
    webhook: WebhookProcess, request_bytes: bytes, status: int, error: str
) -> None:
    got_status, got_error = status_and_error(raw_exchange(webhook, request_bytes))
    assert (got_status, error in got_error) == (status, True), got_error
    assert webhook.review("/validate-policies", policy_review(egress("a.example")))["allowed"]


def test_a_client_that_sends_its_whole_oversized_body_still_reads_the_413(
    webhook: WebhookProcess,
) -> None:
    body = b"{" + b" " * (3 * 1024 * 1024) + b"}"
    with tls_connection(webhook) as tls:
        tls.sendall(post("/validate-policies", body))  # all of it, then read
        reply = tls.recv(65536)
    status, error = status_and_error(reply)
    assert (status, "the limit is 1048576" in error) == (413, True)


def test_an_oversized_chunked_body_is_refused_with_413(webhook: WebhookProcess) -> None:
    head = (
        b"POST /validate-policies HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n" % (600 * 1024) + b" " * (600 * 1024) + b"\r\n"
    status, error = status_and_error(raw_exchange(webhook, head + chunk + chunk + b"0\r\n\r\n"))
    assert (status, "over the limit" in error) == (413, True)


def test_a_slow_client_times_out_while_others_are_served(webhook: WebhookProcess) -> None:
    with tls_connection(webhook) as slow:
        body = json.dumps(admission_review(**policy_review(egress("a.example")))).encode()
        slow.sendall(post("/validate-policies", body)[:-10])  # then nothing more
        # Served meanwhile: the slow connection holds only itself.
        assert webhook.review("/validate-policies", policy_review(egress("b.example")))["allowed"]
        reply = slow.recv(65536)  # the requestTimeout of 1 s ends it
    status, error = status_and_error(reply)
    assert (status, error) == (408, "the request did not arrive within 1 s")
    assert webhook.proc is not None and webhook.proc.poll() is None


def test_a_rotated_certificate_is_served_to_new_connections(
    webhook: WebhookProcess, tmp_path: Path
) -> None:
    rotated = make_pki(tmp_path / "rotated", ["127.0.0.1"])
    # Written beside, then renamed over: as a Secret volume's atomic update replaces files.
    for source, target in ((rotated.key_pem, webhook.pki.key_pem),
                           (rotated.cert_pem, webhook.pki.cert_pem)):  # fmt: skip
        shutil.copy(source, f"{target}.new")
        os.replace(f"{target}.new", target)
    trusted_new = ssl.create_default_context(cafile=str(rotated.ca_pem))

    def handshake_with_new_certificate() -> bool:
        try:
            with tls_connection(webhook, trusted_new):
                return True
        except ssl.SSLError:
            return False

    wait_for(handshake_with_new_certificate)
    webhook.wait_log(lambda e: e.get("event") == "webhook_certificate_loaded")


def test_a_bad_certificate_pair_keeps_the_previous_one_serving(webhook: WebhookProcess) -> None:
    webhook.pki.cert_pem.write_text("not a certificate")
    webhook.wait_log(lambda e: e.get("event") == "webhook_certificate_reload_failed")
    assert webhook.review("/validate-policies", policy_review(egress("a.example")))["allowed"]


def test_metrics_count_reviews_and_bad_requests(webhook: WebhookProcess) -> None:
    webhook.review("/validate-policies", policy_review(egress("a.example")))
    webhook.review("/validate-policies", policy_review(egress("*.com")))
    raw_exchange(webhook, post("/validate-policies", b"{not json"))
    reply = raw_exchange(webhook, b"GET /metrics HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")
    head, _, text = reply.partition(b"\r\n\r\n")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    lines = text.decode().splitlines()
    for sample in (
        'outgate_webhook_reviews_total{result="allowed",webhook="validate-policies"} 1.0',
        'outgate_webhook_reviews_total{result="denied",webhook="validate-policies"} 1.0',
        'outgate_webhook_bad_requests_total{status="400"} 1.0',
    ):
        assert sample in lines, sample


def test_healthz_and_sigterm(webhook: WebhookProcess) -> None:
    reply = raw_exchange(webhook, b"GET /healthz HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b'{"status":"ok"}')
    assert webhook.stop() == 0


def test_settings_errors_name_the_field_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "webhook.yaml"
    path.write_text(
        "listen: 127.0.0.1:0\ntls: {certFile: a, keyFile: b}\n"
        "inject: {proxy: 'http://x:3128', clusterCIDR: [10.0.0.0/8]}\n"
    )
    result = run_outgate("webhook", "--config", str(path))
    assert result.returncode == 1
    assert re.search(
        r"inject\.clusterCIDR: unknown key .*did you mean 'clusterCIDRs'", result.stderr
    )
    assert "inject.proxy: 'http://x:3128' is not host:port -- fix: write the proxy Service" in (
        result.stderr
    )
