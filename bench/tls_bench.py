"""TLS benchmark rows for Outgate (issue 4): prints one JSON object, then Markdown table rows.

Rows:
  mint/*                      leaf minting cost by key strategy (the measurement behind
                              proxy.tls.certs.LEAF_CURVE: per-leaf P-256 keys)
  tunnel/sni-checked          new tunnels per second, `protocol: tls` (ClientHello parsed, SNI
                              checked before a byte goes upstream)
  tunnel/unchecked            the same with `protocol: tcp` (no check): the difference is the
                              cost of the check
  intercept/keepalive-rps     intercepted HTTPS requests per second on kept-alive connections
                              (50 requests a connection; its p50/p99 are per connection)
  intercept/handshake-warm    new intercepted connections per second, leaf already cached
  intercept/handshake-cold    the same, every connection to a new name (a leaf minted each time)

Everything runs on 127.0.0.1: Outgate started as the CLI starts it (`outgate run --config`), a
scripted DNS server, a first-byte echo upstream and an aiohttp HTTPS origin. The load generator
shares the machine, so rates are relative; `proxy_cpu_us_per_op` (the proxy's own CPU time per
operation, from /proc) is the steadier figure for comparing rows.

    python bench/tls_bench.py [--duration 5] [--concurrency 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402

from proxy.core.hosts import parse_host  # noqa: E402
from proxy.tls.ca import create_ca, init_ca  # noqa: E402
from proxy.tls.certs import mint_certificate, mint_leaf, server_context  # noqa: E402
from tests.support.dnsserver import ScriptedDNSServer  # noqa: E402
from tests.support.origin import OriginServer  # noqa: E402
from tests.tls.hello import hello_record  # noqa: E402

COLD_NAMES = int(os.environ.get("COLD_NAMES", "4000"))
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- minting ------------------------------------------------------------------------------------


def mint_rows(count: int) -> list[dict[str, Any]]:
    """Keygen + sign + SSLContext load per leaf, for three key strategies."""
    ca = create_ca()
    shared = ec.generate_private_key(ec.SECP256R1())
    rows = []
    for strategy in ("shared-p256", "per-leaf-p256", "per-leaf-rsa2048"):
        n = count if strategy != "per-leaf-rsa2048" else max(5, count // 20)
        started = time.perf_counter()
        for index in range(n):
            host = parse_host(f"h{index}.mint.bench")
            if strategy == "per-leaf-p256":
                mint_leaf(ca, host)
                continue
            key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
                shared if strategy == "shared-p256" else rsa.generate_private_key(65537, 2048)
            )
            cert = _sign(ca, host.name, key)
            key_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            server_context(cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem, key_pem)
        per = (time.perf_counter() - started) / n
        rows.append({"row": f"mint/{strategy}", "ms_per_leaf": round(per * 1e3, 3), "leaves": n})
    return rows


def _sign(ca: Any, name: str, key: Any) -> x509.Certificate:
    cert, _ = mint_certificate(ca, parse_host(name))  # same extensions and validity
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        if not isinstance(extension.value, x509.SubjectKeyIdentifier):
            builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder.sign(ca.key, hashes.SHA256())


# --- peers --------------------------------------------------------------------------------------


def _first_byte_server(port_out: Connection) -> None:
    """Child process: answer one byte to the first bytes of each connection, keep it open."""

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.answered = False

        def data_received(self, data: bytes) -> None:
            if not self.answered:
                self.answered = True
                self.transport.write(b"\x16")  # type: ignore[attr-defined]

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(
            Answer, "127.0.0.1", 0, backlog=1024
        )
        port_out.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(serve())


def _origin_server(port_out: Connection, cert: str, key: str) -> None:
    """Child process: the aiohttp HTTPS origin of the test suite."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    origin = OriginServer(ssl_context=context).start()
    port_out.send(origin.port)
    threading.Event().wait()


class Child:
    """A server in its own process, so the load generator's GIL never throttles it."""

    def __init__(self, target: Callable[..., None], *args: object) -> None:
        receive, send = multiprocessing.Pipe(duplex=False)
        self.process = multiprocessing.get_context("fork").Process(
            target=target, args=(send, *args), daemon=True
        )
        self.process.start()
        if not receive.poll(20):
            raise RuntimeError(f"{target.__name__} did not start")
        self.port: int = receive.recv()

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


class Outgate:
    def __init__(self, workdir: Path, *, nameserver: str, ca: tuple[Path, Path], bundle: Path):
        policies = workdir / "policies"
        policies.mkdir(parents=True)
        rules = [
            ("tls-checked", "tls.bench", ""),
            ("unchecked", "tcp.bench", "      protocol: tcp\n"),
            ("inspect-warm", "warm.bench", "      inspect: {}\n"),
            ("inspect-cold", '"*.cold.bench"', "      inspect: {}\n"),
        ]
        text = (
            "apiVersion: outgate.dev/v1alpha1\nkind: EgressPolicy\n"
            "metadata: {name: bench, namespace: bench}\n"
            "spec:\n  podSelector: {}\n  rules:\n"
        )
        for name, fqdn, extra in rules:
            text += (
                f"    - name: {name}\n      action: Allow\n"
                f"      to: [{{fqdn: {fqdn}}}, {{cidr: 127.0.0.0/8}}]\n"
                f"      ports: [{{port: 1024, endPort: 65535}}]\n{extra}"
            )
        (policies / "bench.yaml").write_text(text)
        config = {
            "listen": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
            "policies": {"paths": [str(policies)]},
            "identity": {
                "static": [{"name": "bench", "namespace": "bench", "cidrs": ["127.0.0.1/32"]}]
            },
            "dns": {"nameservers": [nameserver], "minTTL": "300s"},
            # The per-workload rate limits would measure the limiter, not TLS: out of the way.
            "limits": {
                "maxConnectionsPerSource": 20000,
                "newConnectionsPerSecond": 1000000,
                "newConnectionsBurst": 1000000,
                "maxTunnelsPerWorkload": 100000,
            },
            "timeouts": {"drain": "2s"},
            "tls": {
                "caCert": str(ca[0]),
                "caKey": str(ca[1]),
                "upstreamCABundle": str(bundle),
                "certCacheSize": COLD_NAMES * 2,
            },
        }
        path = workdir / "outgate.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        outgate = Path(sys.executable).with_name("outgate")
        command = [str(outgate)] if outgate.exists() else [sys.executable, "-m", "proxy"]
        self.proc = subprocess.Popen(
            [*command, "run", "--config", str(path)],
            stdout=subprocess.DEVNULL,  # audit records: written and discarded, as a sink would
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            entry = json.loads(line)
            if entry.get("event") == "listening":
                self.port = int(entry["proxy"].rsplit(":", 1)[1])
                break
        else:
            raise RuntimeError("outgate did not start")
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --- load ---------------------------------------------------------------------------------------


async def connect_tunnel(
    proxy_port: int, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode("latin-1"))
    return reader, writer


async def run_load(
    op: Callable[[int], Awaitable[int]], *, duration: float, concurrency: int, proxy: Outgate
) -> dict[str, Any]:
    """Run `op(worker)` in `concurrency` loops for `duration`; op returns operations done."""
    done = 0
    errors = 0
    latencies: list[float] = []
    stop_at = time.monotonic() + duration
    cpu_before = proxy.cpu_seconds()

    async def worker(index: int) -> None:
        nonlocal done, errors
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                count = await op(index)  # not `done += await ...`: that reads `done` first
            except (OSError, RuntimeError, ssl.SSLError, asyncio.IncompleteReadError):
                errors += 1
                continue
            done += count
            latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.monotonic() - started
    cpu = proxy.cpu_seconds() - cpu_before
    latencies.sort()
    return {
        "ops": done,
        "errors": errors,
        "per_second": round(done / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 2) if latencies else None,
        "proxy_cpu_us_per_op": round(cpu / done * 1e6, 1) if done else None,
    }


async def bench(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    dns = ScriptedDNSServer().start()
    for name in ("tls.bench", "tcp.bench", "warm.bench"):
        dns.addresses(name, "127.0.0.1")
    for index in range(COLD_NAMES):
        dns.addresses(f"n{index}.cold.bench", "127.0.0.1")
    outgate_ca = init_ca(work / "outgate-ca")
    origin_ca = create_ca(common_name="bench origin CA")
    (work / "origin-ca.pem").write_bytes(origin_ca.cert_pem)
    _origin_certificate(origin_ca, work)
    first_byte = Child(_first_byte_server)
    origin = Child(_origin_server, str(work / "origin.pem"), str(work / "origin.key"))
    proxy = Outgate(
        work / "proxy", nameserver=dns.nameserver, ca=outgate_ca, bundle=work / "origin-ca.pem"
    )
    client_ctx = ssl.create_default_context(cafile=str(outgate_ca[0]))
    client_ctx.set_alpn_protocols(["http/1.1"])
    try:
        for label, host in (("sni-checked", "tls.bench"), ("unchecked", "tcp.bench")):
            hello = hello_record(host.encode())

            async def tunnel(_: int, host: str = host, hello: bytes = hello) -> int:
                reader, writer = await connect_tunnel(proxy.port, host, first_byte.port)
                writer.write(hello)
                await reader.readexactly(1)
                writer.close()
                return 1

            await run_load(tunnel, duration=1, concurrency=args.concurrency, proxy=proxy)  # warm
            result = await run_load(
                tunnel, duration=args.duration, concurrency=args.concurrency, proxy=proxy
            )
            rows.append({"row": f"tunnel/{label}", **result})

        request = b"GET /hello HTTP/1.1\r\nHost: warm.bench\r\n\r\n"

        async def keepalive(_: int) -> int:
            reader, writer = await connect_tunnel(proxy.port, "warm.bench", origin.port)
            await writer.start_tls(client_ctx, server_hostname="warm.bench")
            count = 0
            for _ in range(50):
                writer.write(request)
                await reader.readuntil(b"hello from origin\n")
                count += 1
            writer.close()
            return count

        result = await run_load(
            keepalive, duration=args.duration, concurrency=args.concurrency, proxy=proxy
        )
        rows.append({"row": "intercept/keepalive-rps", **result})

        async def handshake_warm(_: int) -> int:
            reader, writer = await connect_tunnel(proxy.port, "warm.bench", origin.port)
            await writer.start_tls(client_ctx, server_hostname="warm.bench")
            writer.write(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            await reader.readuntil(b"hello from origin\n")
            writer.close()
            return 1

        result = await run_load(
            handshake_warm, duration=args.duration, concurrency=args.concurrency, proxy=proxy
        )
        rows.append({"row": "intercept/handshake-warm", **result})

        names = iter(range(COLD_NAMES))

        async def handshake_cold(_: int) -> int:
            index = next(names, None)
            if index is None:
                await asyncio.sleep(0.01)
                return 0
            name = f"n{index}.cold.bench"
            reader, writer = await connect_tunnel(proxy.port, name, origin.port)
            await writer.start_tls(client_ctx, server_hostname=name)
            writer.write(
                f"GET /hello HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
            )
            await reader.readuntil(b"hello from origin\n")
            writer.close()
            return 1

        result = await run_load(
            handshake_cold, duration=args.duration, concurrency=args.concurrency, proxy=proxy
        )
        rows.append({"row": "intercept/handshake-cold", **result})
    finally:
        proxy.stop()
        origin.stop()
        first_byte.stop()
        dns.stop()
    return rows


def _origin_certificate(ca: Any, work: Path) -> None:
    """The origin's P-256 certificate for warm.bench and *.cold.bench (origin.pem, origin.key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("warm.bench"), x509.DNSName("*.cold.bench")]),
            critical=True,
        )
        .sign(ca.key, hashes.SHA256())
    )
    (work / "origin.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (work / "origin.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| row | per second | p50 ms | p99 ms | proxy CPU µs/op | errors |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["row"].startswith("mint/"):
            out.append(
                f"| {row['row']} | {round(1000 / row['ms_per_leaf'], 1)} | "
                f"{row['ms_per_leaf']} (per leaf) | - | - | - |"
            )
            continue
        out.append(
            f"| {row['row']} | {row['per_second']} | {row['p50_ms']} | {row['p99_ms']} | "
            f"{row['proxy_cpu_us_per_op']} | {row['errors']} |"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per row")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mint-leaves", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    rows = mint_rows(args.mint_leaves)
    with tempfile.TemporaryDirectory(prefix="outgate-tls-bench-") as tmp:
        try:
            import uvloop

            runner: Callable[[Any], Any] = uvloop.run
        except ImportError:  # pragma: no cover
            runner = asyncio.run
        rows += runner(bench(args, Path(tmp)))
    report = {
        "benchmark": "tls",
        "cpus": os.cpu_count(),
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "rows": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
