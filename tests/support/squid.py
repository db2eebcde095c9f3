"""A real Squid as a parent proxy, on loopback, started and stopped by the test (issue 12).

Squid started as root drops to its `proxy` user, so its files live in a directory of their own
that the user can write (a pytest tmp_path is private to root). Its DNS is its `hosts_file`:
the names a test uses, so the parent resolves exactly what the test says.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.support.pki import OriginPKI
from tests.support.tools import free_port, tool
from tests.support.waiting import wait_for

SQUID = tool("squid")
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"
START_TIMEOUT = 30.0


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class SquidParent:
    """`squid -N` on 127.0.0.1:<port>. With `user`/`password`, every request needs Basic proxy
    credentials (basic_ncsa_auth over an MD5-crypt password file)."""

    def __init__(
        self,
        *,
        hosts: dict[str, str],
        user: str | None = None,
        password: str | None = None,
        deny_domains: tuple[str, ...] = (),
        tls: OriginPKI | None = None,
    ) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="outgate-squid-"))
        self.dir.chmod(0o777)
        listen = f"http_port 127.0.0.1:{self.port}"
        if tls is not None:  # TLS from the client (Outgate) to Squid: an https:// parent
            shutil.copy(tls.cert_pem, self.dir / "cert.pem")
            shutil.copy(tls.key_pem, self.dir / "key.pem")
            listen = (
                f"https_port 127.0.0.1:{self.port} "
                f"tls-cert={self.dir}/cert.pem tls-key={self.dir}/key.pem"
            )
        (self.dir / "hosts").write_text("".join(f"{ip} {name}\n" for name, ip in hosts.items()))
        auth = ""
        access = "http_access allow localhost\n"
        if user is not None and password is not None:
            digest = subprocess.run(
                ["openssl", "passwd", "-1", "-stdin"],
                input=password,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            (self.dir / "passwd").write_text(f"{user}:{digest}\n")
            auth = (
                f"auth_param basic program {NCSA_AUTH} {self.dir}/passwd\n"
                "auth_param basic realm outgate-test-parent\n"
                "acl authenticated proxy_auth REQUIRED\n"
            )
            access = "http_access allow localhost authenticated\n"
        deny = ""
        if deny_domains:
            deny = f"acl refused dstdomain {' '.join(deny_domains)}\nhttp_access deny refused\n"
        for name in ("hosts", "passwd", "cert.pem", "key.pem"):
            if (self.dir / name).exists():
                (self.dir / name).chmod(0o644)
        self.access_log = self.dir / "access.log"
        (self.dir / "squid.conf").write_text(
            f"""
{listen}
pid_filename {self.dir}/squid.pid
cache_log {self.dir}/cache.log
access_log stdio:{self.access_log} squid
cache deny all
cache_mem 0 MB
hosts_file {self.dir}/hosts
dns_nameservers 127.0.0.1
shutdown_lifetime 1 seconds
coredump_dir {self.dir}
visible_hostname outgate-test-parent
{auth}acl SSL_ports port 443
acl CONNECT method CONNECT
http_access deny CONNECT !SSL_ports
{deny}{access}http_access deny all
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SquidParent:
        self.proc = subprocess.Popen(
            [SQUID, "-N", "-f", str(self.dir / "squid.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: _accepts(self.port) or self.proc is None or self.proc.poll() is not None,
            timeout=START_TIMEOUT,
            what="squid to listen",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"squid exited at start: {self.cache_log()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SquidParent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cache_log(self) -> str:
        path = self.dir / "cache.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    def wait_access(self, needle: str, timeout: float = 10.0) -> str:
        """The first access.log line containing `needle` (Squid writes it as a request ends)."""
        found = wait_for(
            lambda: next((line for line in self.access_lines() if needle in line), None),
            timeout=timeout,
            what=f"squid access.log line with {needle!r}",
        )
        return str(found)
