"""Run `outgate webhook` as a cluster runs it (its own process, its own settings file, a serving
certificate from files) and speak to it as the API server does: AdmissionReview JSON over HTTPS.

The fast tests POST reviews directly; the real-API-server tier registers the same process in a
ValidatingWebhookConfiguration / MutatingWebhookConfiguration (`url` with `caBundle`).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from tests.support.pki import OriginPKI, make_pki
from tests.support.proxyproc import START_TIMEOUT, json_lines, outgate_command, terminate

POLICY_API = {"group": "outgate.dev", "version": "v1alpha1"}


class WebhookProcess:
    def __init__(
        self,
        workdir: Path,
        *,
        inject: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        listen: str = "127.0.0.1:0",
        pki: OriginPKI | None = None,
    ) -> None:
        """`pki`: the serving certificate (and the CA that signed it); a fresh one by default."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.pki = pki or make_pki(workdir / "tls", ["127.0.0.1", "localhost"])
        settings: dict[str, Any] = {
            "listen": listen,
            "tls": {"certFile": str(self.pki.cert_pem), "keyFile": str(self.pki.key_pem)},
        }
        if limits:
            settings["limits"] = limits
        if inject is not None:
            settings["inject"] = inject
        self.config_path = workdir / "webhook.yaml"
        self.config_path.write_text(yaml.safe_dump(settings))
        self.logs: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> WebhookProcess:
        self.proc = subprocess.Popen(
            [*outgate_command(), "webhook", "--config", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        listening = self.wait_log(lambda e: e.get("event") == "webhook_listening", START_TIMEOUT)
        self.port = int(listening["address"].rsplit(":", 1)[1])
        return self

    def stop(self) -> int:
        if self.proc is None:
            return 0
        code = terminate(self.proc)
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code

    def __enter__(self) -> WebhookProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for entry in json_lines(self.proc.stderr):
            with self._cond:
                self.logs.append(entry)
                self._cond.notify_all()

    def wait_log(self, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((e for e in self.logs if pred(e)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    raise AssertionError(f"waited {timeout}s for a log entry; {self.logs[-10:]}")
                self._cond.wait(min(left, 0.2))

    # -- speaking to it -------------------------------------------------------------------
    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca_pem))

    def post(
        self, path: str, body: bytes, *, content_type: str = "application/json"
    ) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.client_context(), timeout=10
        )
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def review(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        """POST one AdmissionReview; the response's `response` part."""
        status, body = self.post(path, json.dumps(admission_review(**request)).encode())
        assert status == 200, body
        response: dict[str, Any] = body["response"]
        return response


def admission_review(
    *,
    kind: str,
    obj: dict[str, Any] | None,
    operation: str = "CREATE",
    namespace: str = "",
    group: str = "",
    dry_run: bool = False,
) -> dict[str, Any]:
    metadata = (obj or {}).get("metadata", {})
    version = "v1alpha1" if group else "v1"
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": kind.lower() + "s"},
            "operation": operation,
            "namespace": namespace,
            "name": metadata.get("name", ""),
            "object": obj,
            "dryRun": dry_run,
            "userInfo": {"username": "tester"},
        },
    }


def decoded_patch(response: dict[str, Any]) -> list[dict[str, Any]]:
    if "patch" not in response:
        return []
    assert response["patchType"] == "JSONPatch"
    patch: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return patch
