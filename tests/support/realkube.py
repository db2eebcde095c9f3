"""A real etcd and kube-apiserver on loopback, for the tests in tests/realkube.

The API server runs as a cluster's does in the ways the proxy meets it: RBAC on, anonymous
access off, bearer tokens only (a static admin token, and ServiceAccount tokens from
TokenRequest), an audit log of every request at Metadata level. There is no kubelet,
scheduler or controller-manager: pods stay Pending until a test gives them an address through
the `pods/status` subresource, as a kubelet would, and ServiceAccount admission is off (it would
wait for a controller to create each namespace's `default` account).

Binaries: `OUTGATE_KUBE_APISERVER` and `OUTGATE_ETCD` name existing ones (envtest's, for
example); otherwise tests/realkube/build-apiserver.sh builds kube-apiserver once per machine
into ~/.cache/outgate-realkube (`make test` runs it) and etcd is Debian's.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.pki import make_pki
from tests.support.proxyproc import ProxyProcess
from tests.support.tools import free_port
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("OUTGATE_REALKUBE_CACHE", Path.home() / ".cache" / "outgate-realkube"))
BUILDER = REPO / "tests" / "realkube" / "build-apiserver.sh"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# A restart of a 1.20 server takes about 5 s to /readyz on this kind of machine; generous for a
# loaded one.
READY_TIMEOUT = 90.0
# The API server's audit policy: every request's user, verb, resource and response code.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata"}],
}


class Unavailable(Exception):
    """The binaries are missing and cannot be built here; the message says why."""


@dataclass(frozen=True)
class Binaries:
    apiserver: Path
    etcd: Path
    etcdctl: Path | None


def find_binaries() -> Binaries:
    """The binaries named by the environment, or the per-machine build; `Unavailable` says why
    neither is there."""
    apiserver = os.environ.get("OUTGATE_KUBE_APISERVER")
    etcd = os.environ.get("OUTGATE_ETCD") or shutil.which("etcd") or "/usr/bin/etcd"
    candidate = Path(apiserver) if apiserver else CACHE / "bin" / "kube-apiserver"
    if not os.access(candidate, os.X_OK):
        how = (
            f"OUTGATE_KUBE_APISERVER={apiserver} is not executable"
            if apiserver
            else f"{candidate} is missing: `{BUILDER.relative_to(REPO)}` builds it "
            "(make test runs it; it needs apt-get and Debian's package mirror)"
        )
        raise Unavailable(how)
    if not os.access(etcd, os.X_OK):
        raise Unavailable(f"no etcd at {etcd}: set OUTGATE_ETCD or apt-get install etcd-server")
    etcdctl = os.environ.get("OUTGATE_ETCDCTL") or shutil.which("etcdctl")
    return Binaries(candidate, Path(etcd), Path(etcdctl) if etcdctl else None)


def write_service_account_keys(directory: Path) -> None:
    """sa.key and sa.pub: the key pair the API server signs and checks ServiceAccount tokens
    with (RSA: what 1.20's token signer expects)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (directory / "sa.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "sa.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "test",
                        "cluster": {"server": server, "certificate-authority": str(ca_file)},
                    }
                ],
                "users": [{"name": "test", "user": {"token": token}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                "current-context": "test",
            }
        )
    )
    return path


class ApiError(AssertionError):
    def __init__(self, status: int, method: str, path: str, body: Any) -> None:
        super().__init__(f"{method} {path}: {status} {body}")
        self.status = status
        self.body = body


class RealKube:
    """etcd and kube-apiserver processes in `state_dir`, on free loopback ports."""

    def __init__(
        self, state_dir: Path, *, binaries: Binaries, apiserver_args: Iterable[str] = ()
    ) -> None:
        self.state = state_dir
        self.state.mkdir(parents=True, exist_ok=True)
        self.binaries = binaries
        self.extra_args = list(apiserver_args)
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.pki = make_pki(self.state / "pki", ["127.0.0.1", "localhost"])
        self.ca_file = self.pki.ca_pem
        self.audit_log = self.state / "audit.log"
        self.admin_token = secrets.token_hex(24)
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        self._resources: dict[tuple[str, str], tuple[str, bool]] = {}
        write_service_account_keys(self.state)
        (self.state / "tokens.csv").write_text(
            f"{self.admin_token},outgate-test-admin,uid-admin,system:masters\n"
        )
        (self.state / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
        self.admin_kubeconfig = write_kubeconfig(
            self.state / "admin.kubeconfig", self.url, self.ca_file, self.admin_token
        )
        self._tls = ssl.create_default_context(cafile=str(self.ca_file))
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self._tls)
        )

    # -- processes -----------------------------------------------------------------------
    def start(self) -> RealKube:
        try:
            self.start_etcd()
            self.start_apiserver()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        """A server process in its own session, writing both streams to `log_name`."""
        with (self.state / log_name).open("ab") as log:
            return subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)

    def start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        self.etcd = self._spawn(
            [
                str(self.binaries.etcd),
                "--name=outgate-test",
                f"--data-dir={self.state / 'etcd-data'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=outgate-test={peer}",
                "--listen-metrics-urls=",
                "--logger=zap",
                "--log-outputs=stderr",
            ],
            "etcd.log",
        )
        wait_for(self._etcd_healthy, READY_TIMEOUT, interval=0.1, what="etcd healthy")

    def _etcd_healthy(self) -> bool:
        self._check_alive(self.etcd, "etcd.log")
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{self.etcd_port}/health", timeout=2
            ) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def start_apiserver(self) -> float:
        """Start kube-apiserver and return when /readyz answers 200; returns that moment
        (time.monotonic())."""
        state = self.state
        self.apiserver = self._spawn(
            [
                str(self.binaries.apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                "--insecure-port=0",
                f"--cert-dir={state / 'certs'}",
                f"--tls-cert-file={self.pki.cert_pem}",
                f"--tls-private-key-file={self.pki.key_pem}",
                f"--client-ca-file={self.ca_file}",
                f"--token-auth-file={state / 'tokens.csv'}",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={state / 'sa.pub'}",
                f"--service-account-signing-key-file={state / 'sa.key'}",
                f"--api-audiences={ISSUER}",
                "--authorization-mode=RBAC",
                "--anonymous-auth=false",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--disable-admission-plugins=ServiceAccount",
                "--profiling=false",
                f"--audit-policy-file={state / 'audit-policy.yaml'}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-maxsize=200",
                "--logtostderr",
                "--v=1",
                *self.extra_args,
            ],
            "apiserver.log",
        )
        wait_for(self._ready, READY_TIMEOUT, interval=0.1, what="kube-apiserver /readyz")
        return time.monotonic()

    def _ready(self) -> bool:
        self._check_alive(self.apiserver, "apiserver.log")
        try:
            status, _ = self.api("GET", "/readyz", raw=True)
        except OSError:
            return False
        return status == 200

    def _check_alive(self, proc: subprocess.Popen[bytes] | None, log: str) -> None:
        if proc is not None and proc.poll() is not None:
            tail = (self.state / log).read_text(errors="replace").splitlines()[-20:]
            raise AssertionError(f"{log} process exited {proc.returncode}:\n" + "\n".join(tail))

    def stop_apiserver(self) -> None:
        _terminate(self.apiserver)
        self.apiserver = None

    def restart_apiserver(
        self, *, down_for: float = 0.0, while_down: Callable[[], object] | None = None
    ) -> float:
        """Stop the API server (etcd keeps running) and start it again: every watch is cut, and
        every older resourceVersion expires. `down_for`: seconds between the old process's exit
        and the new one's start (a kubelet restarting a static pod takes some; clients meet
        refused connections meanwhile). `while_down` is called once it has exited (the
        outage lasts at least as long as the call). Returns the moment it is ready
        (time.monotonic())."""
        self.stop_apiserver()
        self._resources.clear()
        restart_at = time.monotonic() + down_for
        if while_down is not None:
            while_down()
        time.sleep(max(0.0, restart_at - time.monotonic()))
        return self.start_apiserver()

    def peer(self, state_dir: Path) -> RealKube:
        """Another API server on this one's etcd, as a control plane of two replicas has: what
        is written through it is what this one serves, also while this one is down. It has its
        own port, certificates, admin token and audit log; its `stop()` stops only it."""
        other = RealKube(
            state_dir,
            binaries=self.binaries,
            # Both advertise 127.0.0.1: only one keeps the `kubernetes` Endpoints.
            apiserver_args=[*self.extra_args, "--endpoint-reconciler-type=none"],
        )
        other.etcd_port = self.etcd_port
        try:
            other.start_apiserver()
        except BaseException:
            other.stop()
            raise
        return other

    def stop(self) -> None:
        self.stop_apiserver()
        _terminate(self.etcd)
        self.etcd = None

    def compact(self) -> int:
        """Compact etcd at its current revision (older resourceVersions become 410 Gone for
        requests that reach etcd); returns that revision."""
        if self.binaries.etcdctl is None:
            raise Unavailable("no etcdctl: apt-get install etcd-client")
        endpoint = f"--endpoints=http://127.0.0.1:{self.etcd_port}"
        env = {**os.environ, "ETCDCTL_API": "3"}
        status = subprocess.run(
            [str(self.binaries.etcdctl), endpoint, "endpoint", "status", "--write-out=json"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=30,
        )
        revision = int(json.loads(status.stdout)[0]["Status"]["header"]["revision"])
        subprocess.run(
            [str(self.binaries.etcdctl), endpoint, "compact", str(revision), "--physical"],
            capture_output=True,
            check=True,
            env=env,
            timeout=30,
        )
        return revision

    # -- the API ---------------------------------------------------------------------------
    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        content_type: str | None = None,
        query: Mapping[str, str] | None = None,
        accept: str = "application/json",
        raw: bool = False,
    ) -> tuple[int, Any]:
        """One request as the admin (or as `token`); (status, parsed JSON or text). Raises
        `ApiError` on a status of 400 or more unless `raw`."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (https only)
        request.add_header("Authorization", f"Bearer {token or self.admin_token}")
        request.add_header("Accept", accept)
        if data is not None:
            request.add_header("Content-Type", content_type or "application/json")
        try:
            with self._opener.open(request, timeout=30) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        try:
            parsed: Any = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload.decode(errors="replace")
        if status >= 400 and not raw:
            raise ApiError(status, method, path, parsed)
        return status, parsed

    def resource_path(self, api_version: str, kind: str, namespace: str | None = None) -> str:
        """The collection path of `kind`, from the server's discovery documents."""
        key = (api_version, kind)
        if key not in self._resources:
            base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            _, listing = self.api("GET", base)
            for resource in listing["resources"]:
                if "/" not in resource["name"]:
                    found = (f"{base}/{resource['name']}", resource["namespaced"])
                    self._resources[(api_version, resource["kind"])] = found
        if key not in self._resources:
            raise KeyError(f"{api_version} {kind} is not served")
        collection, namespaced = self._resources[key]
        if namespaced:
            prefix, _, plural = collection.rpartition("/")
            return f"{prefix}/namespaces/{namespace or 'default'}/{plural}"
        return collection

    def object_path(self, obj: Mapping[str, Any]) -> str:
        meta = obj["metadata"]
        collection = self.resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        return f"{collection}/{meta['name']}"

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create `obj`, or replace the stored one (its spec; status is kept by the server)."""
        path = self.object_path(obj)
        status, created = self.api("POST", path.rpartition("/")[0], obj, raw=True)
        if status < 300:
            return dict(created)
        if status != 409:
            raise ApiError(status, "POST", path, created)
        _, current = self.api("GET", path)
        replacement = json.loads(json.dumps(obj))
        replacement["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        _, replaced = self.api("PUT", path, replacement)
        return dict(replaced)

    def apply_file(self, path: Path) -> list[dict[str, Any]]:
        return [self.apply(doc) for doc in yaml.safe_load_all(path.read_text()) if doc]

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        status, body = self.api("DELETE", path, raw=True)
        if status >= 400 and not (missing_ok and status == 404):
            raise ApiError(status, "DELETE", path, body)

    def wait_established(self, crd_name: str) -> None:
        def established() -> bool:
            _, crd = self.api(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd_name}"
            )
            # A CRD just created may show `conditions: null` for a moment.
            conditions = (crd.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        wait_for(established, 30, what=f"CRD {crd_name} Established")

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": dict(labels or {})},
            }
        )

    def create_pod(
        self,
        namespace: str,
        name: str,
        ip: str,
        *,
        labels: Mapping[str, str] | None = None,
        owner: tuple[str, str] | None = None,
        service_account: str | None = None,
    ) -> dict[str, Any]:
        """A pod given `ip` through `pods/status` (phase Running), as its node's kubelet would.
        `owner` is (kind, name) of its controller, for example ("ReplicaSet", "api-5f7c9")."""
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        metadata["labels"] = dict(labels or {})
        if owner is not None:
            kind, owner_name = owner
            group = {"ReplicaSet": "apps/v1", "Job": "batch/v1"}.get(kind, "apps/v1")
            metadata["ownerReferences"] = [
                {
                    "apiVersion": group,
                    "kind": kind,
                    "name": owner_name,
                    "uid": f"uid-{owner_name}",
                    "controller": True,
                }
            ]
        spec: dict[str, Any] = {"containers": [{"name": "app", "image": "app:test"}]}
        if service_account:
            spec["serviceAccountName"] = service_account
        pods = f"/api/v1/namespaces/{namespace}/pods"
        self.api(
            "POST", pods, {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
        )
        _, stored = self.api(
            "PATCH",
            f"{pods}/{name}/status",
            {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}},
            content_type="application/merge-patch+json",
        )
        return dict(stored)

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A bound token for the ServiceAccount, from the TokenRequest API."""
        _, answer = self.api(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"audiences": [ISSUER], "expirationSeconds": seconds},
            },
        )
        return str(answer["status"]["token"])

    def service_account_kubeconfig(self, namespace: str, name: str, dest: Path) -> Path:
        return write_kubeconfig(
            dest, self.url, self.ca_file, self.service_account_token(namespace, name)
        )

    # -- the audit log ---------------------------------------------------------------------
    def audit_events(self, *, user: str | None = None) -> Iterator[dict[str, Any]]:
        """The audit log's events, optionally for one user name: every completed request, and
        each watch once its stream has started (a watch completes only when it ends)."""
        if not self.audit_log.exists():
            return
        for line in self.audit_log.read_text().splitlines():
            event = json.loads(line)
            stage = event.get("stage")
            if not (
                stage == "ResponseComplete"
                or (stage, event.get("verb")) == ("ResponseStarted", "watch")
            ):
                continue
            if user is None or event.get("user", {}).get("username") == user:
                yield event


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- what tests of the tier share ------------------------------------------------------

PORTS = [{"port": 1024, "endPort": 65535}]


def cluster_policy(name: str, namespace: str, *allow: str) -> dict[str, Any]:
    """A ClusterEgressPolicy allowing the pods of `namespace` to reach `allow` and loopback."""
    return {
        "apiVersion": "outgate.dev/v1alpha1",
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": name},
        "spec": {
            "tier": "admin",
            "subject": {
                # (1.20 does not label namespaces with their name; the tests do.)
                "namespaceSelector": {"matchLabels": {"outgate.dev/test-namespace": namespace}}
            },
            "rules": [
                {
                    "name": "allow-origin",
                    "action": "Allow",
                    "to": [*({"fqdn": f} for f in allow), {"cidr": "127.0.0.0/8"}],
                    "ports": PORTS,
                }
            ],
        },
    }


def api_errors_in(proxy: ProxyProcess) -> list[dict[str, Any]]:
    return [e for e in proxy.logs if e.get("status") in (401, 403)]
