"""Where the Kubernetes API is and how to authenticate: in-cluster, or a kubeconfig subset.

In-cluster (the production case): `KUBERNETES_SERVICE_HOST`/`_PORT`, the service-account token
and CA mounted at /var/run/secrets/kubernetes.io/serviceaccount. The token is a *bound* token
the kubelet rotates (it expires within an hour and is refreshed at 80% of its life), so it is
re-read from the file every minute, as client-go does, and at once after a 401.

A kubeconfig (development, tests) is read for its current context only, and only the parts a
token or certificate needs: cluster `server`, `certificate-authority` / `-data`,
`insecure-skip-tls-verify`, `tls-server-name`; user `token` / `tokenFile`,
`client-certificate` / `client-key` and their `-data` forms. Exec plugins, auth providers and
basic auth are refused with a message, never silently ignored. Relative paths resolve against
the kubeconfig's directory, as kubectl resolves them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
import yaml

from proxy.errors import ConfigError, ConfigIssue
from proxy.fdio import pem_path

log = structlog.get_logger(__name__)

SERVICE_ACCOUNT_DIR: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# client-go's cached token source re-reads the file this often; a kubelet-rotated token is
# valid for at least ten minutes past its rotation, so a minute is always early enough.
TOKEN_REREAD_SECONDS: Final = 60.0

_UNSUPPORTED_USER_KEYS: Final = {
    "exec": "run the plugin yourself and put its token in tokenFile, or use a service account",
    "auth-provider": "use a token or a client certificate",
    "username": "basic auth is removed from Kubernetes; use a token or a client certificate",
    "password": "basic auth is removed from Kubernetes; use a token or a client certificate",
}


class TokenSource:
    """A bearer token, fixed or read from a file; a file is re-read every `reread_after`
    seconds and at once after `invalidate()` (called on a 401)."""

    def __init__(
        self,
        *,
        token: str | None = None,
        path: Path | None = None,
        reread_after: float = TOKEN_REREAD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (token is None) == (path is None):
            raise ValueError("a token or a token file, not both")
        self.path = path
        self._value = token
        self._reread_after = reread_after
        self._clock = clock
        self._read_at = float("-inf")

    @property
    def rereadable(self) -> bool:
        return self.path is not None

    def get(self) -> str | None:
        if self.path is not None and self._clock() - self._read_at >= self._reread_after:
            self._read()
        return self._value

    def invalidate(self) -> None:
        self._read_at = float("-inf")

    def _read(self) -> None:
        assert self.path is not None
        self._read_at = self._clock()
        try:
            value = self.path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            # Keep the token we had: a rotation replaces the file atomically, so a failed read
            # is a transient problem, and an old token is still valid for minutes.
            log.warning("kube_token_read_failed", path=str(self.path), error=str(exc))
            return
        if value:
            self._value = value


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    server: str  # scheme://host:port[/path prefix], no trailing slash
    ssl_context: ssl.SSLContext | None  # None for plain http (kubectl proxy)
    token: TokenSource | None = None
    tls_server_name: str | None = None
    namespace: str = "default"  # the proxy's own namespace (in-cluster) or the context's
    source: str = ""  # where this came from, for the log


def in_cluster_config(
    *,
    environ: Mapping[str, str] | None = None,
    account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> ClusterConfig:
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
    where = "identity.kubeconfig"
    if not host or not port:
        raise _error(
            "<in-cluster>",
            where,
            "KUBERNETES_SERVICE_HOST/PORT are not set: not running in a pod",
            "set identity.kubeconfig to a kubeconfig file when running outside a cluster",
        )
    if ":" in host:
        host = f"[{host}]"
    token_path, ca_path = account_dir / "token", account_dir / "ca.crt"
    if not token_path.exists() or not ca_path.exists():
        raise _error(
            "<in-cluster>",
            where,
            f"no service-account token or CA under {account_dir}",
            "mount the service-account token (automountServiceAccountToken: true)",
        )
    namespace = "default"
    with contextlib.suppress(OSError):
        namespace = (account_dir / "namespace").read_text(encoding="utf-8").strip() or namespace
    context = ssl.create_default_context(cafile=str(ca_path))
    return ClusterConfig(
        server=f"https://{host}:{port}",
        ssl_context=context,
        token=TokenSource(path=token_path),
        namespace=namespace,
        source="in-cluster",
    )


def load_kubeconfig(path: str | Path) -> ClusterConfig:
    """The current context of a kubeconfig file; ConfigError naming the field on any problem."""
    path = Path(path)
    label = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _error(label, "", f"cannot read the kubeconfig: {exc}", "check the path") from None
    except yaml.YAMLError as exc:
        raise _error(label, "", f"not YAML: {exc}", "fix the kubeconfig's YAML") from None
    if not isinstance(raw, dict):
        raise _error(label, "", "a kubeconfig is a mapping", "point at a kubeconfig file")
    base = path.resolve().parent
    context_name = raw.get("current-context")
    contexts = _named(raw, "contexts", "context", label)
    if not isinstance(context_name, str) or not context_name:
        if len(contexts) != 1:
            raise _error(
                label,
                "current-context",
                "no current-context",
                "set current-context (kubectl config use-context NAME)",
            )
        context_name = next(iter(contexts))
    context = contexts.get(context_name)
    if context is None:
        raise _error(
            label,
            "current-context",
            f"context {context_name!r} is not defined",
            f"define it under contexts, or pick one of {sorted(contexts)}",
        )
    clusters = _named(raw, "clusters", "cluster", label)
    users = _named(raw, "users", "user", label)
    cluster = clusters.get(str(context.get("cluster", "")))
    if cluster is None:
        raise _error(
            label,
            f"contexts[{context_name}].context.cluster",
            f"cluster {context.get('cluster')!r} is not defined",
            "define it under clusters",
        )
    user_name = context.get("user")
    user: Mapping[str, Any] = {}
    if user_name is not None:
        found = users.get(str(user_name))
        if found is None:
            raise _error(
                label,
                f"contexts[{context_name}].context.user",
                f"user {user_name!r} is not defined",
                "define it under users",
            )
        user = found
    for key, fix in _UNSUPPORTED_USER_KEYS.items():
        if key in user:
            raise _error(label, f"users[{user_name}].user.{key}", f"{key} is not supported", fix)

    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise _error(
            label,
            f"clusters[{context.get('cluster')}].cluster.server",
            f"server {server!r} is not an http(s) URL",
            "write server: https://host:port",
        )
    ssl_context: ssl.SSLContext | None = None
    if server.startswith("https://"):
        try:
            ssl_context = _ssl_context(cluster, user, base, label)
        except (OSError, ssl.SSLError) as exc:  # a missing file, a PEM that does not parse
            raise _error(
                label,
                f"contexts[{context_name}]",
                f"cannot load the CA or client certificate: {exc}",
                "check the certificate-authority and client-certificate/key entries",
            ) from None
    else:
        log.warning("kube_plain_http", server=server, note="only for kubectl proxy on localhost")
    token: TokenSource | None = None
    if isinstance(user.get("tokenFile"), str):
        token = TokenSource(path=_resolve(base, user["tokenFile"]))
    elif isinstance(user.get("token"), str):
        token = TokenSource(token=user["token"])
    server_name = cluster.get("tls-server-name")
    return ClusterConfig(
        server=server.rstrip("/"),
        ssl_context=ssl_context,
        token=token,
        tls_server_name=server_name if isinstance(server_name, str) else None,
        namespace=str(context.get("namespace") or "default"),
        source=f"kubeconfig {label} context {context_name}",
    )


def _ssl_context(
    cluster: Mapping[str, Any], user: Mapping[str, Any], base: Path, label: str
) -> ssl.SSLContext:
    if cluster.get("insecure-skip-tls-verify") is True:
        log.warning("kube_tls_verification_disabled", kubeconfig=label)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif isinstance(cluster.get("certificate-authority-data"), str):
        pem = _b64(cluster["certificate-authority-data"], label, "certificate-authority-data")
        context = ssl.create_default_context(cadata=pem.decode("ascii", "replace"))
    elif isinstance(cluster.get("certificate-authority"), str):
        context = ssl.create_default_context(
            cafile=str(_resolve(base, cluster["certificate-authority"]))
        )
    else:
        context = ssl.create_default_context()  # a cluster with a publicly trusted certificate
    cert, key = user.get("client-certificate"), user.get("client-key")
    cert_data, key_data = user.get("client-certificate-data"), user.get("client-key-data")
    if isinstance(cert, str) and isinstance(key, str):
        context.load_cert_chain(str(_resolve(base, cert)), str(_resolve(base, key)))
    elif isinstance(cert_data, str) and isinstance(key_data, str):
        # ssl loads a certificate chain only from a path: an anonymous memory file, so the key
        # is written to no filesystem (and a read-only root without /tmp can load it).
        cert = _b64(cert_data, label, "client-certificate-data")
        key = _b64(key_data, label, "client-key-data")
        with pem_path(cert) as cert_path, pem_path(key) as key_path:
            context.load_cert_chain(cert_path, key_path)
    return context


def _named(raw: Mapping[str, Any], section: str, inner: str, label: str) -> dict[str, Any]:
    entries = raw.get(section) or []
    if not isinstance(entries, list):
        raise _error(label, section, f"{section} must be a list", f"write {section}: [...]")
    found: dict[str, Any] = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            body = entry.get(inner)
            found[entry["name"]] = body if isinstance(body, dict) else {}
    return found


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _b64(value: str, label: str, key: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _error(label, key, "not valid base64", "paste the base64 of the PEM") from None


def _error(file: str, path: str, message: str, fix: str) -> ConfigError:
    return ConfigError([ConfigIssue(file=file, document=None, path=path, message=message, fix=fix)])
