"""A scripted DNS server for tests: real UDP and TCP on 127.0.0.1, answers chosen by the test.

The server runs its own thread (a selector loop), so sync and async tests use it alike and
the code under test talks to it exactly as to a real nameserver. Every test scripts what a
(name, qtype) returns:

    dns_server.answer("api.example.com", "A", Records("203.0.113.7", ttl=60))
    dns_server.answer("www.example.com", "A", Cname("api.example.com"))
    dns_server.answer("gone.example.com", "A", NXDOMAIN)
    dns_server.answer("slow.example.com", "AAAA", DROP)
    dns_server.answer("rebind.example.com", "A", Records("203.0.113.7", ttl=0),
                      Records("127.0.0.1", ttl=0))   # one per query; the last one repeats

Unscripted names answer NXDOMAIN. `queries` lists every (name, qtype) received, in order.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, NamedTuple

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

# A recursive resolver gives up on long CNAME chains; so does the script, which also makes a
# scripted CNAME loop terminate (the client then sees the loop it must cope with).
MAX_CHASE = 16
# Classic DNS over UDP: without EDNS a reply larger than this is truncated (RFC 1035 4.2.1).
UDP_LIMIT_WITHOUT_EDNS = 512
# How long the server thread may take to notice `stop()`; the wake-up socket makes it prompt.
STOP_JOIN_TIMEOUT = 5.0
# Records a forged reply carries, so a test can assert they never reach the caller.
FORGED_A = "203.0.113.66"
FORGED_AAAA = "2001:db8::66"

Forgery = Literal["wrong_id", "wrong_question", "other_port"]
Transport = Literal["udp", "tcp"]


@dataclass(frozen=True, kw_only=True)
class Response:
    """What one query gets. Options shared by every kind of response:

    - `delay`: seconds before the reply is sent (other queries are served meanwhile).
    - `truncate_udp`: over UDP, reply with TC set and no records (the client must retry on TCP).
    - `forge`: before the real UDP reply, send a forged one carrying FORGED_A / FORGED_AAAA with
      a wrong id, a wrong question, or from another port; a correct client ignores it.
    """

    delay: float = 0.0
    truncate_udp: bool = False
    forge: Forgery | None = None


@dataclass(frozen=True, kw_only=True, init=False)
class Records(Response):
    """NOERROR with these records of the queried type (addresses for A / AAAA)."""

    values: tuple[str, ...]
    ttl: int = 300

    def __init__(
        self,
        *values: str,
        ttl: int = 300,
        delay: float = 0.0,
        truncate_udp: bool = False,
        forge: Forgery | None = None,
    ) -> None:
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "ttl", ttl)
        object.__setattr__(self, "delay", delay)
        object.__setattr__(self, "truncate_udp", truncate_udp)
        object.__setattr__(self, "forge", forge)


@dataclass(frozen=True, kw_only=True)
class Cname(Response):
    """A CNAME to `target`; with `include_target` the target's scripted answer for the same
    qtype follows in the same reply, as a recursive resolver sends it."""

    target: str
    ttl: int = 300
    include_target: bool = True


@dataclass(frozen=True, kw_only=True)
class Rcode(Response):
    """A reply with this rcode and an empty answer section (NOERROR = "no data")."""

    rcode: Literal["NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP"]


@dataclass(frozen=True, kw_only=True)
class Drop(Response):
    """Never reply (the client times out)."""


@dataclass(frozen=True, kw_only=True)
class Custom(Response):
    """Any answer section: (owner name, rdtype, ttl, rdata text) tuples, sent as given."""

    answer: tuple[tuple[str, str, int, str], ...] = ()
    rcode: Literal["NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED"] = "NOERROR"


NXDOMAIN = Rcode(rcode="NXDOMAIN")
SERVFAIL = Rcode(rcode="SERVFAIL")
REFUSED = Rcode(rcode="REFUSED")
NODATA = Rcode(rcode="NOERROR")
DROP = Drop()


class Query(NamedTuple):
    name: str
    qtype: str
    transport: Transport


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


@dataclass
class _Script:
    responses: tuple[Response, ...]
    served: int = 0

    def next(self) -> Response:
        response = self.responses[min(self.served, len(self.responses) - 1)]
        self.served += 1
        return response


@dataclass
class _Conn:
    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)


class ScriptedDNSServer:
    """DNS over UDP and TCP on one port of `host`, answering from a per-(name, qtype) script."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._requested_port = port
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._lock = threading.Lock()
        self._scripts: dict[tuple[str, str], _Script] = {}
        self._received: list[Query] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._forger: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._port = 0
        self._errors: list[Exception] = []

    # -- scripting ---------------------------------------------------------------------------

    def answer(self, name: str, qtype: str = "A", *responses: Response) -> None:
        """Script (name, qtype): one response per query in order, the last one repeating.

        Replaces any earlier script for the pair. With no responses, answers NODATA.
        """
        script = _Script(responses or (NODATA,))
        with self._lock:
            self._scripts[(_norm(name), qtype.upper())] = script

    def addresses(self, name: str, *values: str, ttl: int = 300) -> None:
        """Shortcut: script A and/or AAAA for `name` from a mixed list of addresses."""
        v4 = tuple(v for v in values if ":" not in v)
        v6 = tuple(v for v in values if ":" in v)
        self.answer(name, "A", Records(*v4, ttl=ttl) if v4 else NODATA)
        self.answer(name, "AAAA", Records(*v6, ttl=ttl) if v6 else NODATA)

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every (name, qtype) received, oldest first (a copy; safe from any thread)."""
        with self._lock:
            return [(q.name, q.qtype) for q in self._received]

    @property
    def received(self) -> list[Query]:
        """Like `queries`, with the transport each query came over."""
        with self._lock:
            return list(self._received)

    def count(self, name: str, qtype: str | None = None) -> int:
        """How many queries for `name` (and `qtype`, if given) arrived."""
        wanted = _norm(name)
        with self._lock:
            return sum(
                1
                for q in self._received
                if q.name == wanted and (qtype is None or q.qtype == qtype.upper())
            )

    def clear_queries(self) -> None:
        with self._lock:
            self._received.clear()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return (self._host, self._port)

    @property
    def nameserver(self) -> str:
        """The "host:port" form a resolver is configured with."""
        host = f"[{self._host}]" if self._family == socket.AF_INET6 else self._host
        return f"{host}:{self._port}"

    def start(self) -> ScriptedDNSServer:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._udp, self._tcp = self._bind()
        self._port = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="scripted-dns", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        thread.join(STOP_JOIN_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("scripted DNS server thread did not stop")
        self._thread = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        if self._errors:
            raise RuntimeError(
                f"scripted DNS server failed: {self._errors[0]!r}"
            ) from self._errors[0]

    def __enter__(self) -> ScriptedDNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        # UDP and TCP must share one port number; an ephemeral UDP port may be taken for TCP,
        # so try again with another.
        last_error: OSError | None = None
        for _ in range(50):
            udp = socket.socket(self._family, socket.SOCK_DGRAM)
            tcp = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                udp.bind((self._host, self._requested_port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self._host, port))
                tcp.listen(16)
            except OSError as exc:
                udp.close()
                tcp.close()
                last_error = exc
                if self._requested_port:
                    raise
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise RuntimeError(f"could not bind UDP and TCP on one port: {last_error}")

    # -- server thread -----------------------------------------------------------------------

    def _run(self) -> None:
        assert self._udp is not None and self._tcp is not None and self._wake_r is not None
        selector = selectors.DefaultSelector()
        conns: dict[int, _Conn] = {}
        timers: list[tuple[float, int, Callable[[], None]]] = []
        sequence = itertools.count()

        def later(delay: float, action: Callable[[], None]) -> None:
            if delay <= 0:
                action()
            else:
                heapq.heappush(timers, (time.monotonic() + delay, next(sequence), action))

        selector.register(self._udp, selectors.EVENT_READ, "udp")
        selector.register(self._tcp, selectors.EVENT_READ, "listen")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else None
                for key, _ in selector.select(timeout):
                    try:
                        if key.data == "udp":
                            self._on_udp(later)
                        elif key.data == "listen":
                            self._on_accept(selector, conns)
                        elif key.data == "wake":
                            with contextlib.suppress(OSError):
                                self._wake_r.recv(64)
                        else:
                            self._on_tcp_readable(selector, conns, conns[key.fd], later)
                    except Exception as exc:
                        # A bad script must fail the test, not silently kill the server.
                        self._errors.append(exc)
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    _, _, action = heapq.heappop(timers)
                    action()
        finally:
            for conn in conns.values():
                conn.sock.close()
            selector.close()
            for sock in (self._udp, self._tcp, self._forger):
                if sock is not None:
                    sock.close()
            self._udp = self._tcp = self._forger = None

    def _on_udp(self, later: Callable[[float, Callable[[], None]], None]) -> None:
        assert self._udp is not None
        udp = self._udp
        try:
            wire, peer = udp.recvfrom(65535)
        except OSError:
            return
        query = self._parse(wire, "udp")
        if query is None:
            return
        response_spec, message = self._respond(query)
        if response_spec is None or message is None:
            return
        if response_spec.truncate_udp:
            message.answer.clear()
            message.flags |= dns.flags.TC
        limit = query.payload if query.edns >= 0 else UDP_LIMIT_WITHOUT_EDNS
        # Records keep the scripted order (dnspython shuffles rdata unless told not to), so
        # tests can assert on answer order.
        reply = message.to_wire(max_size=limit, prefer_truncation=True, want_shuffle=False)
        forged = self._forged(query, response_spec.forge)

        def send() -> None:
            if forged is not None:
                sender = self._forger_socket() if response_spec.forge == "other_port" else udp
                with contextlib.suppress(OSError):
                    sender.sendto(forged, peer)
            with contextlib.suppress(OSError):
                udp.sendto(reply, peer)

        later(response_spec.delay, send)

    def _on_accept(self, selector: selectors.BaseSelector, conns: dict[int, _Conn]) -> None:
        assert self._tcp is not None
        try:
            sock, _ = self._tcp.accept()
        except OSError:
            return
        # Reads happen only after the selector reports data; a blocking send with a timeout
        # keeps the loop simple for replies that are a few kilobytes at most.
        sock.settimeout(2.0)
        conns[sock.fileno()] = _Conn(sock)
        selector.register(sock, selectors.EVENT_READ, "conn")

    def _on_tcp_readable(
        self,
        selector: selectors.BaseSelector,
        conns: dict[int, _Conn],
        conn: _Conn,
        later: Callable[[float, Callable[[], None]], None],
    ) -> None:
        try:
            data = conn.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            selector.unregister(conn.sock)
            del conns[conn.sock.fileno()]
            conn.sock.close()
            return
        conn.buffer += data
        while len(conn.buffer) >= 2:
            (length,) = struct.unpack("!H", conn.buffer[:2])
            if len(conn.buffer) < 2 + length:
                break
            wire = bytes(conn.buffer[2 : 2 + length])
            del conn.buffer[: 2 + length]
            query = self._parse(wire, "tcp")
            if query is None:
                continue
            response_spec, message = self._respond(query)
            if response_spec is None or message is None:
                continue
            framed = message.to_wire(prepend_length=True, max_size=65535, want_shuffle=False)

            def send(sock: socket.socket = conn.sock, framed: bytes = framed) -> None:
                with contextlib.suppress(OSError):
                    sock.sendall(framed)

            later(response_spec.delay, send)

    def _parse(self, wire: bytes, transport: Transport) -> dns.message.Message | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None  # Garbage is dropped, as a real server would.
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return None
        question = query.question[0]
        name = _norm(question.name.to_text())
        with self._lock:
            self._received.append(Query(name, dns.rdatatype.to_text(question.rdtype), transport))
        return query

    def _respond(
        self, query: dns.message.Message
    ) -> tuple[Response | None, dns.message.Message | None]:
        """The scripted response for `query`; (None, None) when the script says to drop it."""
        question = query.question[0]
        qtype = dns.rdatatype.to_text(question.rdtype)
        message = dns.message.make_response(query, recursion_available=True)
        first: Response | None = None
        owner = question.name
        for _ in range(MAX_CHASE):
            with self._lock:
                script = self._scripts.get((_norm(owner.to_text()), qtype))
                spec = script.next() if script is not None else NXDOMAIN
            if first is None:
                first = spec
            if isinstance(spec, Drop):
                return None, None
            if isinstance(spec, Records):
                if spec.values:
                    message.answer.append(
                        dns.rrset.from_text(owner, spec.ttl, "IN", qtype, *spec.values)
                    )
                break
            if isinstance(spec, Custom):
                for rname, rtype, ttl, value in spec.answer:
                    message.answer.append(
                        dns.rrset.from_text_list(
                            dns.name.from_text(rname),
                            ttl,
                            "IN",
                            rtype,
                            [value],
                            origin=dns.name.root,
                            relativize=False,
                        )
                    )
                message.set_rcode(dns.rcode.from_text(spec.rcode))
                break
            if isinstance(spec, Rcode):
                message.set_rcode(dns.rcode.from_text(spec.rcode))
                break
            if isinstance(spec, Cname):
                target = dns.name.from_text(spec.target)
                message.answer.append(
                    dns.rrset.from_text(owner, spec.ttl, "IN", "CNAME", target.to_text())
                )
                if not spec.include_target:
                    break
                owner = target
        return first, message

    def _forged(self, query: dns.message.Message, forge: Forgery | None) -> bytes | None:
        if forge is None:
            return None
        question = query.question[0]
        qtype = dns.rdatatype.to_text(question.rdtype)
        value = FORGED_AAAA if qtype == "AAAA" else FORGED_A
        if forge == "wrong_question":
            fake_query = dns.message.make_query("forged.invalid.", question.rdtype, id=query.id)
            forged = dns.message.make_response(fake_query)
            owner = fake_query.question[0].name
        else:
            forged = dns.message.make_response(query)
            owner = question.name
            if forge == "wrong_id":
                forged.id = (query.id + 1) & 0xFFFF
        forged.answer.append(dns.rrset.from_text(owner, 300, "IN", qtype, value))
        return forged.to_wire()

    def _forger_socket(self) -> socket.socket:
        if self._forger is None:
            self._forger = socket.socket(self._family, socket.SOCK_DGRAM)
            self._forger.bind((self._host, 0))
        return self._forger


@pytest.fixture
def dns_server() -> Iterator[ScriptedDNSServer]:
    """A started ScriptedDNSServer on 127.0.0.1 (UDP and TCP, one ephemeral port)."""
    with ScriptedDNSServer() as server:
        yield server
