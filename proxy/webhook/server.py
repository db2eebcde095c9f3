"""`outgate webhook`: the admission webhooks, served over HTTPS on their own port.

Two webhooks, both called by the API server (docs/webhooks.md):
  POST /validate-policies  ClusterEgressPolicy / EgressPolicy, checked by the loader that checks
                           files and cluster objects (the same field paths, messages and fixes);
                           an invalid one is refused and `kubectl apply` prints why.
  POST /mutate-pods        a Pod of an opted-in namespace (or an opted-in pod) gets the proxy
                           settings proxy.core.injection computes, as a JSONPatch. Any error
                           there allows the pod unchanged: the webhook never blocks a pod.
  GET  /healthz            200 while serving.

HTTP/1.1 is read with the proxy's strict parser (proxy.core.http1), in this module rather than
by aiohttp, because every bound must hold against a client that is slow or hostile, not just a
well-behaved API server: the head and body of a request must arrive within `requestTimeout`
from its first byte (408), the head within MAX_HEAD_BYTES (431), the body within
`maxRequestBytes` (413, refused from its Content-Length before a byte of it is read), and a body
that is not an AdmissionReview is a 400 naming what is wrong. Each connection is its own task,
so a slow client holds only its own connection.

The certificate and key are files (a Secret, written by cert-manager or by hand), polled like
every watched file (proxy.control.watched_file) and swapped in for new handshakes when they
change; a pair that does not load keeps the previous one serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, NamedTuple

import structlog

from proxy.control.kube.policies import policy_from_object
from proxy.control.watched_file import POLL_INTERVAL, poll_for_changes
from proxy.core.admission import AdmissionError, AdmissionRequest, allow, deny, parse_review
from proxy.core.hosts import Host
from proxy.core.http1 import (
    BodyFraming,
    ChunkedDecoder,
    RequestForm,
    find_head_end,
    parse_request_head,
)
from proxy.core.injection import Injection, mutate_pod
from proxy.core.policy.model import PolicyKind
from proxy.errors import OutgateError
from proxy.metrics import (
    WEBHOOK_BAD_REQUESTS,
    WEBHOOK_CERTIFICATE_RELOADS,
    WEBHOOK_REVIEWS,
    exposition,
)
from proxy.tasks import TaskSet
from proxy.webhook.config import WebhookSettings

log = structlog.get_logger(__name__)

# An AdmissionReview's head is a few hundred bytes; 16 KiB leaves room for any proxy in front.
MAX_HEAD_BYTES: Final = 16 * 1024
# Longer than Go's http.Transport idle timeout (90 s), which the API server's webhook client
# uses, so the client closes an idle connection before we do: a POST sent on a connection the
# server is closing at that moment is not retried by Go, and the admission call would fail.
IDLE_TIMEOUT: Final = 120.0
# Connections served at once; the API server keeps a few per webhook. Beyond this a new
# connection is closed at once, so a flood cannot exhaust file descriptors.
MAX_CONNECTIONS: Final = 512
READ_CHUNK: Final = 64 * 1024
# After an error answer, input is read and dropped for this long (`_linger`), at most.
LINGER_SECONDS: Final = 2.0
# A peer that does not read our answer (and its close) within this is cut off.
CLOSE_TIMEOUT: Final = 5.0

_PHRASES: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}
_AUTHORITY: Final = (Host(name="outgate-webhook"), 443)
PROMETHEUS_TEXT: Final = "text/plain; version=0.0.4; charset=utf-8"

Review = Callable[[AdmissionRequest], dict[str, Any]]


class _Answer(NamedTuple):
    status: int
    body: bytes
    keep_alive: bool
    media: str = "application/json"


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ServingCertificate:
    """The listener's TLS context. Each handshake takes the context of the last good load of
    `cert_file`/`key_file` (via the SNI callback, which OpenSSL calls with or without SNI: the
    API server dials an IP address and sends none)."""

    def __init__(self, cert_file: Path, key_file: Path, *, interval: float = POLL_INTERVAL):
        self.cert_file = cert_file
        self.key_file = key_file
        self.interval = interval
        self.loaded_at: float | None = None
        self._seen: tuple[object, ...] | None = None
        self._current = self._load()  # raises at start: no certificate, no webhook
        self.listening = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.listening.minimum_version = ssl.TLSVersion.TLSv1_2
        self.listening.load_cert_chain(cert_file, key_file)
        self.listening.sni_callback = self._select

    def _select(self, conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        conn.context = self._current

    def _fingerprint(self) -> tuple[object, ...]:
        marks: list[object] = []
        for path in (self.cert_file, self.key_file):
            try:
                stat = os.stat(path)
            except OSError:
                marks.append(None)
                continue
            marks.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(marks)

    def _load(self) -> ssl.SSLContext:
        self._seen = self._fingerprint()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        self.loaded_at = time.time()
        return context

    def changed(self) -> bool:
        return self._fingerprint() != self._seen

    def reload(self) -> bool:
        try:
            self._current = self._load()
        except (OSError, ssl.SSLError) as exc:
            WEBHOOK_CERTIFICATE_RELOADS.labels(result="failure").inc()
            log.error(
                "webhook_certificate_reload_failed",
                cert=str(self.cert_file),
                error=str(exc),
                effect="the previous certificate keeps serving",
            )
            return False
        WEBHOOK_CERTIFICATE_RELOADS.labels(result="success").inc()
        log.info("webhook_certificate_loaded", cert=str(self.cert_file))
        return True

    async def run(self) -> None:
        await poll_for_changes(
            self.interval, self.changed, self.reload, error_event="webhook_certificate_watch_error"
        )


# -- the two reviews -----------------------------------------------------------------------------


def review_policy(request: AdmissionRequest) -> dict[str, Any]:
    """Refuse an invalid ClusterEgressPolicy/EgressPolicy with the validator's message."""
    kinds = {kind.value: kind for kind in PolicyKind}
    if request.kind not in kinds:
        return allow(request.uid, warnings=[f"outgate validates policies, not {request.kind}"])
    if request.operation not in ("CREATE", "UPDATE") or request.object is None:
        return allow(request.uid)
    obj = dict(request.object)
    metadata = dict(obj["metadata"]) if isinstance(obj.get("metadata"), dict) else {}
    if request.namespace and not metadata.get("namespace"):
        metadata["namespace"] = request.namespace  # the request's, as the API server stores it
    obj["metadata"] = metadata
    _, issues = policy_from_object(kinds[request.kind], obj)
    if not issues:
        return allow(request.uid)
    # One object, not a file: "(document 1)" would only puzzle the person at `kubectl apply`.
    return deny(request.uid, "\n".join(replace(i, document=None).render() for i in issues))


def pod_reviewer(injection: Injection | None) -> Review:
    def review_pod(request: AdmissionRequest) -> dict[str, Any]:
        """Inject into a Pod on CREATE; anything else, and any failure, allows it unchanged."""
        if injection is None:
            return allow(request.uid, warnings=["outgate webhook: injection is not configured"])
        if request.kind != "Pod" or request.operation != "CREATE" or request.object is None:
            return allow(request.uid)
        try:
            mutation = mutate_pod(request.object, request.namespace, injection)
        except Exception as exc:  # never block a pod over the webhook's own fault
            log.exception("webhook_injection_failed", namespace=request.namespace)
            WEBHOOK_REVIEWS.labels(webhook="mutate-pods", result="error").inc()
            return allow(request.uid, warnings=[f"outgate injection skipped: {exc}"[:200]])
        log.info(
            "webhook_pod",
            namespace=request.namespace,
            name=request.name or None,
            dry_run=request.dry_run,
            skipped=mutation.skipped,
            operations=len(mutation.patch),
        )
        return allow(request.uid, patch=mutation.patch)

    return review_pod


# -- the HTTP server ------------------------------------------------------------------------------


class WebhookServer:
    PATHS: Final = ("/validate-policies", "/mutate-pods")

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.certificate = ServingCertificate(settings.cert_file, settings.key_file)
        self.routes: dict[str, Review] = dict(
            zip(self.PATHS, (review_policy, pod_reviewer(settings.injection)), strict=True)
        )
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.tasks = TaskSet()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        listen = self.settings.listen
        self._server = await asyncio.start_server(
            self._accept,
            listen.host,
            listen.port,
            ssl=self.certificate.listening,
            ssl_handshake_timeout=self.settings.request_timeout,
            limit=READ_CHUNK,
        )
        self.tasks.spawn(self.certificate.run(), name="webhook-certificate")
        log.info("webhook_listening", address=f"{listen.host}:{self.port}")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self.tasks.cancel_all()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._connections.discard(task)
            await _close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        while True:
            if not buffer:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        chunk = await reader.read(READ_CHUNK)
                except TimeoutError:
                    return
                if not chunk:
                    return
                buffer += chunk
            try:
                async with asyncio.timeout(self.settings.request_timeout):
                    answer = await self._one_request(reader, writer, buffer)
            except TimeoutError:
                answer = _error(
                    408,
                    f"the request did not arrive within {self.settings.request_timeout:g} s",
                )
            # A client that does not read its answer is cut off too (TimeoutError, in _accept).
            async with asyncio.timeout(self.settings.request_timeout):
                await _respond(writer, answer)
            if not answer.keep_alive:
                if answer.status >= 400:
                    await _linger(reader)
                return

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, buffer: bytearray
    ) -> _Answer:
        """Read one request from `buffer` and the stream, answer it; the buffer keeps whatever
        follows it (a pipelined request)."""
        try:
            end = find_head_end(buffer, max_head_bytes=MAX_HEAD_BYTES)
            while end < 0:
                start = len(buffer)
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    raise HttpError(400, "the connection closed in the middle of a request")
                buffer += chunk
                end = find_head_end(buffer, max_head_bytes=MAX_HEAD_BYTES, start=start)
            head = parse_request_head(
                bytes(buffer[:end]), form=RequestForm.ORIGIN, authority=_AUTHORITY
            )
        except OutgateError as exc:
            return _error(exc.status, exc.message)
        except HttpError as exc:
            return _error(exc.status, exc.message)
        del buffer[:end]
        path = head.path.split("?", 1)[0]
        try:
            if head.method == "GET" and path in ("/healthz", "/metrics"):
                if head.framing is not BodyFraming.NONE:
                    raise HttpError(400, f"GET {path} takes no body")
                if path == "/metrics":
                    return _Answer(200, exposition(), head.keep_alive, PROMETHEUS_TEXT)
                return _Answer(200, b'{"status":"ok"}', head.keep_alive)
            review = self.routes.get(path)
            if review is None:
                raise HttpError(404, f"no webhook at {path[:100]!r}: use {sorted(self.routes)}")
            if head.method != "POST":
                raise HttpError(405, f"{path} takes POST")
            media = (head.header("content-type") or "").split(";")[0].strip().lower()
            if media != "application/json":
                raise HttpError(415, f"Content-Type must be application/json, not {media!r}")
            if head.expect_continue:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await self._read_body(reader, buffer, head.framing, head.content_length)
            try:
                document = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise HttpError(400, f"the body is not JSON: {exc}"[:300]) from None
            except RecursionError:
                raise HttpError(400, "the body is not JSON: nested too deeply") from None
            try:
                request = parse_review(document)
            except AdmissionError as exc:
                raise HttpError(400, str(exc)) from None
            try:
                answer = review(request)
            except Exception:
                # A bug or an object no client of the API server could send (nested past the
                # parser's depth): an error answer, so the API server applies the webhook's
                # failure policy, and the connection and the server carry on.
                log.exception("webhook_review_failed", webhook=path, uid=request.uid)
                raise HttpError(500, "the review failed; see the webhook's log") from None
            WEBHOOK_REVIEWS.labels(webhook=path.lstrip("/"), result=_result(answer)).inc()
            log.info(
                "webhook_review",
                webhook=path.lstrip("/"),
                uid=request.uid,
                kind=request.kind,
                operation=request.operation,
                namespace=request.namespace or None,
                name=request.name or None,
                allowed=answer["response"]["allowed"],
            )
            return _Answer(200, json.dumps(answer).encode(), head.keep_alive)
        except HttpError as exc:
            # After a refused body the stream is not at a request boundary: close.
            return _error(exc.status, exc.message)

    async def _read_body(
        self,
        reader: asyncio.StreamReader,
        buffer: bytearray,
        framing: BodyFraming,
        length: int | None,
    ) -> bytes:
        limit = self.settings.max_request_bytes
        if framing is BodyFraming.LENGTH:
            assert length is not None
            if length > limit:
                raise HttpError(413, f"the body is {length} bytes; the limit is {limit}")
            while len(buffer) < length:
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    raise HttpError(400, "the connection closed in the middle of the body")
                buffer += chunk
            body = bytes(buffer[:length])
            del buffer[:length]
            return body
        if framing is BodyFraming.CHUNKED:
            decoder = ChunkedDecoder()
            parts: list[bytes] = []
            size = 0
            data = bytes(buffer)
            buffer.clear()
            while True:
                try:
                    pieces = decoder.feed(data)
                except OutgateError as exc:
                    raise HttpError(400, exc.message) from None
                size += sum(len(piece) for piece in pieces)
                if size > limit:
                    raise HttpError(413, f"the body is over the limit of {limit} bytes")
                parts.extend(pieces)
                if decoder.done:
                    buffer += decoder.tail()
                    return b"".join(parts)
                data = await reader.read(READ_CHUNK)
                if not data:
                    raise HttpError(400, "the connection closed in the middle of the body")
        raise HttpError(411, "an AdmissionReview needs a body (Content-Length or chunked)")


async def _linger(reader: asyncio.StreamReader) -> None:
    """RFC 9112 section 9.6: after refusing a request whose body may still be arriving (413, a
    malformed head), read and drop what comes for a moment before closing. Closing with unread
    input makes the kernel reset the connection, and a client still sending would lose the
    answer that says why."""
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(READ_CHUNK):
                pass
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close after the answer has left (TLS close_notify included), or abort a peer that does
    not take it within CLOSE_TIMEOUT."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (TimeoutError, ConnectionError, ssl.SSLError):
        writer.transport.abort()


def _result(answer: dict[str, Any]) -> str:
    response = answer["response"]
    if not response["allowed"]:
        return "denied"
    if "patch" in response:
        return "patched"
    return "allowed"


def _error(status: int, message: str) -> _Answer:
    WEBHOOK_BAD_REQUESTS.labels(status=str(status)).inc()
    log.warning("webhook_bad_request", status=status, error=message[:300])
    return _Answer(status, json.dumps({"error": message, "status": status}).encode(), False)


async def _respond(writer: asyncio.StreamWriter, answer: _Answer) -> None:
    head = (
        f"HTTP/1.1 {answer.status} {_PHRASES.get(answer.status, 'Error')}\r\n"
        f"Content-Type: {answer.media}\r\n"
        f"Content-Length: {len(answer.body)}\r\n"
        + ("" if answer.keep_alive else "Connection: close\r\n")
        + "\r\n"
    )
    writer.write(head.encode("ascii") + answer.body)
    await writer.drain()


async def serve_until_signalled(settings: WebhookSettings) -> None:
    """`outgate webhook`: serve until SIGTERM or SIGINT, then stop accepting and close."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = WebhookServer(settings)
    await server.start()
    try:
        await stop.wait()
    finally:
        log.info("webhook_stopping")
        await server.close()
