"""Real peers for the TLS tests: an origin CA that can also issue broken certificates, a TCP
upstream that records every byte it gets, and a TLS client whose first flight the test shapes."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.tls.ca import create_ca

HOUR = datetime.timedelta(hours=1)


class OriginCA:
    """A CA for test origins (the proxy trusts it through tls.upstreamCABundle)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = create_ca(common_name="Outgate test origin CA")
        self.ca_pem = directory / "origin-ca.pem"
        self.ca_pem.write_bytes(self.ca.cert_pem)
        self._count = 0

    def server_context(
        self,
        names: list[str],
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        self_signed: bool = False,
    ) -> ssl.SSLContext:
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if self_signed else self.ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - HOUR)
            .not_valid_after(not_after or now + 24 * HOUR)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key if self_signed else self.ca.key, hashes.SHA256())
        )
        self._count += 1
        cert_path = self.directory / f"origin-{self._count}.pem"
        key_path = self.directory / f"origin-{self._count}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        return context


@dataclass
class RecordingUpstream:
    """A TCP server on 127.0.0.1 that records what each connection sends and when it closes.

    `greeting`, if set, is sent once the first bytes arrive (an SSH server's banner, postgres'
    'N' to an SSLRequest). It stops itself after `max_connections` or at `stop()`."""

    greeting: bytes | None = None
    max_connections: int = 4
    received: list[bytearray] = field(default_factory=list)
    closed: list[threading.Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        handlers = []
        try:
            while not self._stop.is_set() and len(handlers) < self.max_connections:
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                with self._lock:
                    data, done = bytearray(), threading.Event()
                    self.received.append(data)
                    self.closed.append(done)
                handler = threading.Thread(
                    target=self._handle, args=(conn, data, done), daemon=True
                )
                handler.start()
                handlers.append(handler)
        finally:
            self._listener.close()
        for handler in handlers:
            handler.join(15)

    def _handle(self, conn: socket.socket, data: bytearray, done: threading.Event) -> None:
        with conn:
            conn.settimeout(15)
            greeted = False
            try:
                while chunk := conn.recv(65536):
                    with self._lock:
                        data.extend(chunk)
                    if self.greeting is not None and not greeted:
                        conn.sendall(self.greeting)
                        greeted = True
            except OSError:
                pass
            done.set()

    def connection(self, index: int = 0, timeout: float = 10.0) -> bytes:
        """What connection `index` sent, once it has closed (waits for it to be opened)."""
        deadline = time.monotonic() + timeout
        while len(self.received) <= index:
            if time.monotonic() > deadline:
                raise AssertionError(f"no connection {index} within {timeout}s")
            time.sleep(0.02)
        assert self.closed[index].wait(timeout), "the proxy did not close the upstream"
        with self._lock:
            return bytes(self.received[index])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def __enter__(self) -> RecordingUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def open_tunnel(proxy_port: int, host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A socket through which CONNECT host:port was answered 200."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"proxy closed before answering CONNECT: {answer!r}")
        answer += chunk
    if not answer.startswith(b"HTTP/1.1 200 "):
        rest = b""
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                rest += chunk
        except OSError:
            pass
        sock.close()
        raise ConnectError(answer + rest)
    return sock


class ConnectError(AssertionError):
    def __init__(self, response: bytes) -> None:
        super().__init__(response.decode("latin-1"))
        self.response = response
        head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        self.status = int(head[0].split(" ")[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])
        }


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


class MemoryTLSClient:
    """TLS over a plain socket with the first flight in the test's hands: `send_first` gets the
    ClientHello record bytes and decides how they go on the wire."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str | None):
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname=server_hostname)

    def handshake(self, send_first: Callable[[socket.socket, bytes], None] | None = None) -> None:
        first = True
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                data = self._out.read()
                if first and send_first is not None:
                    send_first(self.sock, data)
                elif data:
                    self.sock.sendall(data)
                first = False
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("closed during the handshake") from None
                self._in.write(chunk)

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def request(self, raw: bytes) -> bytes:
        """Send a request, return everything until the server closes (send Connection: close)."""
        self.tls.write(raw)
        self._flush()
        out = b""
        while True:
            try:
                chunk = self.tls.read(65536)
                if not chunk:
                    return out
                out += chunk
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return out
            data = self.sock.recv(65536)
            if not data:
                self._in.write_eof()
                continue
            self._in.write(data)


def send_byte_by_byte(sock: socket.socket, data: bytes) -> None:
    for index in range(len(data)):
        sock.sendall(data[index : index + 1])
        time.sleep(0.002)  # Nagle is off: each byte leaves alone, and most arrive alone


def send_split_across_records(sock: socket.socket, data: bytes) -> None:
    """Re-frame the single ClientHello record as three records (all one TCP write)."""
    assert data[0] == 22
    length = int.from_bytes(data[3:5], "big")
    message, rest = data[5 : 5 + length], data[5 + length :]
    out = b""
    for chunk in (message[:40], message[40:200], message[200:]):
        out += b"\x16" + data[1:3] + len(chunk).to_bytes(2, "big") + chunk
    sock.sendall(out + rest)
