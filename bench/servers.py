"""The processes a benchmark run needs, each on 127.0.0.1 only and stopped by whoever started it.

- `Origin`: nginx (one worker) serving a small body, a bulk body, over HTTP and HTTPS (ECDSA
  P-256 certificate, so the origin's handshake cost stays small next to the proxies').
- `NameServer`: a tiny authoritative DNS server for the origin's name (Outgate resolves names
  itself, never from /etc/hosts; Squid reads the same answer from its own `hosts_file`).
- `SquidProxy` and `OutgateProxy`: the proxies under test, started with the same allowlist,
  access logging on, caching off, one worker, pinned to one CPU. An `OutgateProxy` with a
  `source` runs the `proxy` package of that checkout (`bench.run --baseline REV`: a git worktree
  of an older revision) with the same interpreter and config; `imported_from` shows which
  files a process started that way imports.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ORIGIN_NAME = "origin.bench.test"
SMALL_BODY_BYTES = 128
BULK_BODY_BYTES = 256 << 20
# Files, connections: 5,000 idle tunnels hold 10,000 sockets in each proxy.
OPEN_FILES = 65536
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
# The DNS answer lives this long in Outgate's cache: one lookup per run, as Squid's hosts_file.
DNS_TTL = 3600


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free port below the ephemeral range: thousands of outgoing connections per scenario
    must not take a listener's port as their source port between one server and the next."""
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randint(max(1024, low - 12000), low - 1)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def raise_open_files_limit() -> None:
    """Children inherit it: the proxies, nginx and the load generator all need many sockets."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, OPEN_FILES)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            want = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def wait_port(port: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


class Process:
    """One child process, pinned to `cpu`, output to files in the run directory."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: str,
        workdir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.cpu = cpu
        self.workdir = workdir
        self.env = env  # None: this process's environment
        self.proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    def start(self, *, stdout_name: str | None = None) -> None:
        out = open(self.workdir / (stdout_name or f"{self.name}.out"), "wb")  # noqa: SIM115
        err = open(self.workdir / f"{self.name}.err", "wb")  # noqa: SIM115
        self._files = [out, err]
        self.proc = subprocess.Popen(
            ["taskset", "-c", self.cpu, *self.argv],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=self.env,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for file in self._files:
            file.close()
        self.proc = None

    def stderr_tail(self, lines: int = 20) -> str:
        path = self.workdir / f"{self.name}.err"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""


# -- origin ------------------------------------------------------------------------------------


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ORIGIN_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(ORIGIN_NAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "origin.crt", workdir / "origin.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Origin(Process):
    def __init__(self, workdir: Path, *, cpu: str) -> None:
        self.http_port = free_port()
        self.https_port = free_port()
        root = workdir / "www"
        root.mkdir(exist_ok=True)
        (root / "small").write_bytes(b"x" * (SMALL_BODY_BYTES - 1) + b"\n")
        with open(root / "bulk", "wb") as bulk:
            bulk.truncate(BULK_BODY_BYTES)  # sparse: no disk, reads are served from zero pages
        cert, key = make_certificate(workdir)
        temp = workdir / "nginx-temp"
        temp.mkdir(exist_ok=True)
        conf = workdir / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
daemon off;
master_process on;
user root;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
worker_rlimit_nofile {OPEN_FILES};
events {{ worker_connections {OPEN_FILES // 2}; multi_accept on; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 600s;
    keepalive_requests 10000000;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    default_type application/octet-stream;
    ssl_protocols TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{
        listen 127.0.0.1:{self.http_port} backlog=4096;
        listen 127.0.0.1:{self.https_port} ssl backlog=4096;
        server_name {ORIGIN_NAME};
        root {root};
    }}
}}
"""
        )
        argv = ["nginx", "-c", str(conf), "-e", "stderr"]
        super().__init__("nginx", argv, cpu=cpu, workdir=workdir)

    def start(self, *, stdout_name: str | None = None) -> None:
        super().start(stdout_name=stdout_name)
        try:
            wait_port(self.http_port)
            wait_port(self.https_port)
        except RuntimeError:
            raise RuntimeError(f"nginx did not start: {self.stderr_tail()}") from None


# -- DNS ---------------------------------------------------------------------------------------


class NameServer:
    """Answers A for the origin's name with 127.0.0.1; NOERROR without records otherwise."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="bench-dns", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue  # a benchmark's DNS server ignores what it cannot read
            reply = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            if name == ORIGIN_NAME and question.rdtype == dns.rdatatype.A:
                reply.answer.append(
                    dns.rrset.from_text(question.name, DNS_TTL, "IN", "A", "127.0.0.1")
                )
            elif name != ORIGIN_NAME:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(reply.to_wire(), peer)

    def stop(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


# -- proxies -----------------------------------------------------------------------------------


class Proxy(Process):
    """A proxy under test. `port` is its listener; `ready()` waits for it to serve."""

    label = ""
    port = 0

    def ready(self) -> None:
        try:
            wait_port(self.port)
        except RuntimeError:
            raise RuntimeError(f"{self.label} did not start: {self.stderr_tail()}") from None


class SquidProxy(Proxy):
    label = "squid"

    def __init__(self, workdir: Path, origin: Origin, *, cpu: str) -> None:
        self.port = free_port()
        sdir = workdir / "squid"
        sdir.mkdir(exist_ok=True)
        sdir.chmod(0o777)  # Squid started as root runs as `proxy` and writes its logs here
        (sdir / "hosts").write_text(f"127.0.0.1 {ORIGIN_NAME}\n")
        conf = sdir / "squid.conf"
        conf.write_text(
            f"""
workers 1
http_port 127.0.0.1:{self.port}
pid_filename {sdir}/squid.pid
cache_log {sdir}/cache.log
access_log stdio:{sdir}/access.log squid
cache deny all
cache_mem 0 MB
hosts_file {sdir}/hosts
max_filedescriptors {OPEN_FILES}
shutdown_lifetime 1 seconds
coredump_dir {sdir}
visible_hostname outgate-bench
acl origin dstdomain {ORIGIN_NAME}
acl origin_ports port {origin.http_port} {origin.https_port}
http_access deny !origin_ports
http_access allow origin
http_access deny all
"""
        )
        super().__init__("squid", ["squid", "-N", "-f", str(conf)], cpu=cpu, workdir=workdir)
        self.access_log = sdir / "access.log"

    @staticmethod
    def version() -> str:
        out = subprocess.run(["squid", "-v"], capture_output=True, text=True, check=False)
        first = out.stdout.splitlines()[0] if out.stdout else "squid"
        return first.replace("Squid Cache: Version ", "Squid ")


class OutgateProxy(Proxy):
    label = "outgate"

    def __init__(
        self,
        workdir: Path,
        origin: Origin,
        nameserver: NameServer,
        *,
        cpu: str,
        workers: int = 1,
        python: Path,
        name: str = "outgate",
        source: Path | None = None,
        limits: dict[str, Any] | None = None,
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        odir = workdir / safe_name(name)
        odir.mkdir(exist_ok=True)
        (odir / "policies").mkdir(exist_ok=True)
        policy: dict[str, Any] = {
            "apiVersion": "outgate.dev/v1alpha1",
            "kind": "EgressPolicy",
            "metadata": {"name": "bench-origin", "namespace": "bench"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "loadgen"}},
                "rules": [
                    {
                        "name": "origin",
                        "action": "Allow",
                        # The origin is on loopback: the address guard opens it only for a rule
                        # that lists it as a cidr (DESIGN section 4). Tunnels: protocol tls.
                        "to": [{"fqdn": ORIGIN_NAME}, {"cidr": "127.0.0.1/32"}],
                        "ports": [origin.http_port, origin.https_port],
                    }
                ],
            },
        }
        (odir / "policies" / "bench.yaml").write_text(yaml.safe_dump(policy))
        config = {
            "listen": f"127.0.0.1:{self.port}",
            "admin": f"127.0.0.1:{self.admin_port}",
            "workers": workers,
            "defaultAction": "deny",
            "policies": {"paths": ["policies"]},
            "identity": {
                "static": [
                    {
                        "name": "loadgen",
                        "namespace": "bench",
                        "cidrs": ["127.0.0.1/32"],
                        "labels": {"app": "loadgen"},
                    }
                ]
            },
            "dns": {"nameservers": [f"127.0.0.1:{nameserver.port}"], "minTTL": "60s"},
            "timeouts": {"idle": "600s", "drain": "2s"},
            # Squid limits none of these by default: the load generator is one workload.
            "limits": {
                "maxConnections": 20000,
                "maxConnectionsPerSource": 20000,
                "newConnectionsPerSecond": 1000000,
                "newConnectionsBurst": 1000000,
                "maxTunnelsPerWorkload": 20000,
                **(limits or {}),
            },
        }
        (odir / "outgate.yaml").write_text(yaml.safe_dump(config))
        argv = [str(python), "-m", "proxy", "run", "--config", str(odir / "outgate.yaml")]
        self.label = name
        self.source = source
        super().__init__(
            safe_name(name), argv, cpu=cpu, workdir=odir, env=outgate_environment(source)
        )
        self.audit_log = odir / "audit.log"

    def start(self, *, stdout_name: str | None = None) -> None:
        super().start(stdout_name=stdout_name or "audit.log")


def safe_name(name: str) -> str:
    """A label such as `outgate@HEAD~1` or `outgate@origin/main` as one file name."""
    return "".join(c if c.isalnum() or c in "._@-" else "_" for c in name)


def outgate_environment(source: Path | None) -> dict[str, str] | None:
    """The environment Outgate runs in: unchanged for the working tree (the venv's editable
    install), or with `source` first on PYTHONPATH, so `python -m proxy` imports that checkout's
    package. PYTHONPATH entries come before site-packages, and setuptools' editable finder is
    appended to sys.meta_path, after the path finder, so the checkout wins; `imported_from`
    checks it."""
    if source is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(source), os.environ.get("PYTHONPATH", "")) if part
    )
    return env


# Imports what `python -m proxy run` imports (the CLI, then the app and its data plane) and
# reports where every `proxy` module came from.
_IMPORT_PROBE = """
import contextlib, json, sys
import proxy, proxy.cli
with contextlib.suppress(ImportError):
    import proxy.app
files = sorted(
    getattr(m, "__file__", None) or "?"
    for n, m in list(sys.modules.items())
    if n == "proxy" or n.startswith("proxy.")
)
print(json.dumps({"proxy_file": proxy.__file__, "files": files}))
"""


def imported_from(python: Path, source: Path | None, cwd: Path) -> dict[str, Any]:
    """Where a proxy started as OutgateProxy starts it (same interpreter, environment and kind
    of working directory) imports `proxy` from: `proxy_file`, and `outside`, the loaded proxy
    modules that are not under the expected tree (empty when the right code runs)."""
    root = source if source is not None else Path(__file__).resolve().parent.parent
    expected = (root / "proxy").resolve()
    out = subprocess.run(
        [str(python), "-c", _IMPORT_PROBE],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=outgate_environment(source),
        timeout=60,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"importing proxy failed: {out.stderr[-1500:]}")
    found: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    files = found.pop("files")
    found["expected"] = str(expected)
    found["modules"] = len(files)
    found["outside"] = [f for f in files if not Path(f).resolve().is_relative_to(expected)]
    return found


def require_imports(
    python: Path, source: Path | None, cwd: Path, *, label: str, prefix: str
) -> dict[str, Any]:
    """`imported_from`, printed once (`prefix: label imports proxy from ...`); RuntimeError when
    `proxy` or any of its modules comes from outside the expected tree."""
    found = imported_from(python, source, cwd)
    print(
        f"{prefix}: {label} imports proxy from {found['proxy_file']} ({found['modules']} "
        f"proxy modules, {len(found['outside'])} from outside {found['expected']})",
        flush=True,
    )
    if found["outside"] or not Path(found["proxy_file"]).resolve().is_relative_to(
        found["expected"]
    ):
        raise RuntimeError(f"{label} imports proxy modules from elsewhere: {found}")
    return found


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: run bench/install.sh")
    return path
