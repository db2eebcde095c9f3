"""A fake Kubernetes API server speaking the real list/watch protocol, over HTTPS on 127.0.0.1.

What it speaks, as the real API server does:
- collections under /api/v1 and /apis/GROUP/VERSION, cluster-wide or /namespaces/NS/...;
- LIST with `limit` and `continue` (a continue token names a frozen snapshot; it expires on
  compaction or on demand: 410 reason Expired);
- WATCH (`watch=true`) as chunked, newline-delimited JSON events from `resourceVersion`,
  BOOKMARK events when asked (only if `allowWatchBookmarks`), `timeoutSeconds`;
- compaction: a watch from a version older than the compaction point gets an ERROR event with
  code 410 (or, if `compaction_error == "http"`, an HTTP 410);
- resourceVersions that are *not* numbers (`rv.00002a.x`): a client must treat them as opaque;
- bearer-token auth (401 for a wrong token; more tokens, each a user, with `add_token`), and
  Events created with POST (409 on a name clash);
- GET and PUT of one object (PUT with a stale resourceVersion: 409 Conflict, as a Lease update
  racing another replica's gets), Leases (coordination.k8s.io/v1), and merge PATCH of the
  `status` subresource of the policy kinds (only `.status` changes, the generation stays; 404
  for a deleted object; 409 when `metadata.resourceVersion` in the patch is not the stored one).

Faults to inject: queued error answers (401/403/429 with Retry-After/500), a watch aborted in
the middle of an event, a stalled watch, an event split into many chunks (one cut inside a
UTF-8 character), raw lines (malformed JSON, unknown types), held LISTs (readiness), changes
made without any event (only a relist finds them), a cap on every watch's length, and a
restart (`go_down`, `come_back`): every watch is cut, connections are refused while it is
down, and every older resourceVersion is expired when it is back, as a real API server's
restart does (its watch cache starts again at etcd's current revision).

The server runs on its own event loop in its own thread; every public method is thread-safe
and may be called from a test's thread or event loop. Run as a module, it serves N generated
pods for the benchmark: `python -m tests.support.fakekube --pods 150000 --dir DIR`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import datetime
import json
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from aiohttp import web

from tests.support.pki import OriginPKI, make_pki

T = TypeVar("T")


@dataclass(frozen=True)
class ResourceInfo:
    prefix: str
    namespaced: bool
    kind: str
    api_version: str


RESOURCES: dict[str, ResourceInfo] = {
    "pods": ResourceInfo("/api/v1", True, "Pod", "v1"),
    "namespaces": ResourceInfo("/api/v1", False, "Namespace", "v1"),
    "events": ResourceInfo("/api/v1", True, "Event", "v1"),
    "jobs": ResourceInfo("/apis/batch/v1", True, "Job", "batch/v1"),
    "clusteregresspolicies": ResourceInfo(
        "/apis/outgate.dev/v1alpha1", False, "ClusterEgressPolicy", "outgate.dev/v1alpha1"
    ),
    "egresspolicies": ResourceInfo(
        "/apis/outgate.dev/v1alpha1", True, "EgressPolicy", "outgate.dev/v1alpha1"
    ),
    "leases": ResourceInfo("/apis/coordination.k8s.io/v1", True, "Lease", "coordination.k8s.io/v1"),
}
# Resources with a status subresource (PATCH .../NAME/status).
STATUS_SUBRESOURCE = frozenset({"clusteregresspolicies", "egresspolicies"})
MERGE_PATCH = "application/merge-patch+json"
_PREFIXES = sorted({info.prefix for info in RESOURCES.values()}, key=len, reverse=True)
_RV = re.compile(r"rv\.([0-9a-f]+)\.x\Z")


def encode_rv(number: int) -> str:
    return f"rv.{number:06x}.x"


def decode_rv(text: str) -> int | None:
    match = _RV.match(text)
    return int(match.group(1), 16) if match else None


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class RequestRecord:
    at: float
    method: str
    resource: str
    verb: str  # list | watch | create | get | update | patch | other
    params: dict[str, str]
    status: int = 0
    user: str = ""
    name: str = ""
    subresource: str = ""


@dataclass
class _Stored:
    obj: dict[str, Any]
    text: str


@dataclass(eq=False)
class _Watcher:
    namespace: str | None
    bookmarks: bool
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    stalled: bool = False
    next_event_fault: str | None = None  # "abort_mid" | "split"


@dataclass
class _Collection:
    info: ResourceInfo
    objects: dict[tuple[str, str], _Stored] = field(default_factory=dict)
    history: list[tuple[int, str, str, str]] = field(default_factory=list)  # rv, type, ns, line
    watchers: set[_Watcher] = field(default_factory=set)


@dataclass
class _Fault:
    resource: str
    verb: str
    status: int
    times: int
    retry_after: int | None


class FakeKube:
    def __init__(self, directory: Path, *, token: str | None = "token-1") -> None:  # noqa: S107
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.pki: OriginPKI = make_pki(directory / "pki", ["127.0.0.1", "localhost"])
        self.token = token
        self.users: dict[str, str] = {}  # more tokens (add_token): token -> user
        self.port = 0
        self.compaction_error = "event"  # or "http"
        self.watch_max_seconds: float | None = None
        # Every watch is answered as if its version were compacted (a broken server that lists
        # fine and expires every version it hands out).
        self.expire_every_watch = False
        self.requests: list[RequestRecord] = []
        self.events_posted: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._collections = {name: _Collection(info) for name, info in RESOURCES.items()}
        self._rv = 1000
        self._compacted = 0
        self._snapshots: dict[str, tuple[int, list[str]]] = {}
        self._faults: list[_Fault] = []
        self._expire_next_continue = False
        self._held_lists: dict[str, asyncio.Event] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._stopping = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> FakeKube:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stop(), timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen()
        self.port = int(self._runner.addresses[0][1])

    async def _listen(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(
            self._runner, "127.0.0.1", self.port, ssl_context=self.pki.server_context()
        )
        await site.start()
        self._site = site

    async def _stop(self) -> None:
        self._stopping.set()
        for collection in self._collections.values():
            for watcher in list(collection.watchers):
                watcher.queue.put_nowait(("close", None))
        for held in self._held_lists.values():
            held.set()
        if self._runner is not None:
            # Abort rather than close: a graceful TLS close would wait for clients that may
            # be gone, past the end of this loop (and leave unclosed transports behind).
            server = self._runner.server
            for handler in list(server.connections) if server is not None else []:
                if handler.transport is not None:
                    handler.transport.abort()
            await asyncio.sleep(0.05)
            await self._runner.cleanup()
            await asyncio.sleep(0.05)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run(self, fn: Callable[[], T], timeout: float | None = 30) -> T:
        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def add_token(self, token: str, user: str) -> None:
        """Accept `token` as well, as `user` (RequestRecord.user): two clients told apart."""
        with self._lock:
            self.users[token] = user

    def kubeconfig(
        self,
        *,
        token_file: Path | None = None,
        name: str = "kubeconfig",
        token: str | None = None,
    ) -> Path:
        """A kubeconfig for this server: the test CA, and the token (or a token file)."""
        user: dict[str, Any] = {}
        if token_file is not None:
            user["tokenFile"] = str(token_file)
        elif (token or self.token) is not None:
            user["token"] = token or self.token
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {"server": self.url, "certificate-authority": str(self.pki.ca_pem)},
                }
            ],
            "users": [{"name": "tester", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
            "current-context": "fake",
        }
        path = self.directory / name
        path.write_text(yaml.safe_dump(config))
        return path

    # -- state (thread-safe) --------------------------------------------------------------
    @property
    def resource_version(self) -> str:
        return encode_rv(self._rv)

    def create(self, resource: str, obj: dict[str, Any], *, silent: bool = False) -> dict[str, Any]:
        return self._run(lambda: self._put(resource, obj, "ADDED", silent))

    def update(self, resource: str, obj: dict[str, Any], *, silent: bool = False) -> dict[str, Any]:
        return self._run(lambda: self._put(resource, obj, "MODIFIED", silent))

    def patch(
        self,
        resource: str,
        namespace: str,
        name: str,
        mutate: Callable[[dict[str, Any]], None],
        *,
        silent: bool = False,
    ) -> dict[str, Any]:
        def change() -> dict[str, Any]:
            stored = self._collections[resource].objects[(namespace, name)]
            obj = copy.deepcopy(stored.obj)
            mutate(obj)
            return self._put(resource, obj, "MODIFIED", silent)

        return self._run(change)

    def delete(self, resource: str, namespace: str, name: str, *, silent: bool = False) -> None:
        def remove() -> None:
            collection = self._collections[resource]
            stored = collection.objects.pop((namespace, name))
            self._rv += 1
            obj = copy.deepcopy(stored.obj)
            obj["metadata"]["resourceVersion"] = encode_rv(self._rv)
            if not silent:
                self._record_event(collection, "DELETED", obj)

        self._run(remove)

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        return self._run(
            lambda: copy.deepcopy(self._collections[resource].objects[(namespace, name)].obj)
        )

    def seed(self, resource: str, objects: Iterable[dict[str, Any]]) -> int:
        """Store many objects at once, without history (as after a compaction)."""

        def load() -> int:
            count = 0
            for obj in objects:
                self._put(resource, obj, "ADDED", True, owned=True)
                count += 1
            self._compacted = self._rv
            return count

        return self._run(load, timeout=None)

    def compact(self) -> None:
        """Forget history up to now (etcd compaction): older watches and continues expire."""

        def compact() -> None:
            self._compacted = self._rv
            for collection in self._collections.values():
                collection.history = [h for h in collection.history if h[0] > self._compacted]
            self._snapshots.clear()

        self._run(compact)

    def bookmark(self, resource: str) -> None:
        def send() -> None:
            info = RESOURCES[resource]
            line = json.dumps(
                {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": info.kind,
                        "apiVersion": info.api_version,
                        "metadata": {"resourceVersion": encode_rv(self._rv)},
                    },
                }
            )
            for watcher in self._collections[resource].watchers:
                if watcher.bookmarks:
                    watcher.queue.put_nowait(("line", line))

        self._run(send)

    def bump(self, count: int = 1) -> None:
        """Advance the resourceVersion as changes to resources nobody watches would."""

        def bump() -> None:
            self._rv += count

        self._run(bump)

    def go_down(self) -> None:
        """An API-server restart, first half: every watch is cut and every connection dropped,
        and new connections are refused until `come_back`. Objects are kept (etcd is)."""

        async def down() -> None:
            if self._site is not None:
                await self._site.stop()
                self._site = None
            for collection in self._collections.values():
                for watcher in list(collection.watchers):
                    watcher.queue.put_nowait(("abort", None))
            server = self._runner.server if self._runner is not None else None
            for handler in list(server.connections) if server is not None else []:
                if handler.transport is not None:
                    handler.transport.abort()

        self._call(down())

    def come_back(self) -> None:
        """An API-server restart, second half: listening again on the same port, with every
        version older than now expired (a watch from one gets 410)."""

        async def back() -> None:
            self._rv += 1  # a starting API server writes (its lease, its endpoints)
            self._compacted = self._rv
            for collection in self._collections.values():
                collection.history.clear()
            self._snapshots.clear()
            await self._listen()

        self._call(back())

    # -- faults ---------------------------------------------------------------------------
    def fail(
        self,
        resource: str,
        verb: str,
        status: int,
        *,
        times: int = 1,
        retry_after: int | None = None,
    ) -> None:
        """The next `times` requests of `verb` (list, watch, create, any) answer `status`."""
        with self._lock:
            self._faults.append(_Fault(resource, verb, status, times, retry_after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def expire_next_continue(self) -> None:
        self._run(lambda: setattr(self, "_expire_next_continue", True))

    def fault_next_event(self, resource: str, fault: str) -> None:
        """For every open watch: the next event is cut in the middle and the connection
        aborted ("abort_mid"), or sent in many small chunks ("split")."""

        def mark() -> None:
            for watcher in self._collections[resource].watchers:
                watcher.next_event_fault = fault

        self._run(mark)

    def stall_watches(self, resource: str) -> None:
        """Open watches of `resource` stop sending anything; they stay open. New ones work."""

        def stall() -> None:
            for watcher in self._collections[resource].watchers:
                watcher.stalled = True
                watcher.queue.put_nowait(("stall", None))

        self._run(stall)

    def abort_watches(self, resource: str) -> None:
        def abort() -> None:
            for watcher in self._collections[resource].watchers:
                watcher.queue.put_nowait(("abort", None))

        self._run(abort)

    def inject_line(self, resource: str, line: bytes) -> None:
        def inject() -> None:
            for watcher in self._collections[resource].watchers:
                watcher.queue.put_nowait(("raw", line))

        self._run(inject)

    def hold_lists(self, resource: str) -> None:
        self._run(lambda: self._held_lists.setdefault(resource, asyncio.Event()))

    def release_lists(self, resource: str) -> None:
        def release() -> None:
            held = self._held_lists.pop(resource, None)
            if held is not None:
                held.set()

        self._run(release)

    def open_watches(self, resource: str) -> int:
        return self._run(lambda: len(self._collections[resource].watchers))

    def objects(self, resource: str) -> list[dict[str, Any]]:
        return self._run(
            lambda: [copy.deepcopy(s.obj) for s in self._collections[resource].objects.values()]
        )

    def requests_for(self, resource: str, verb: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.resource == resource and (verb is None or r.verb == verb)
            ]

    # -- internals (on the server loop) -----------------------------------------------------
    def _put(
        self, resource: str, obj: dict[str, Any], kind: str, silent: bool, *, owned: bool = False
    ) -> dict[str, Any]:
        """Store `obj` (copied unless `owned`: the caller hands it over) and return a copy."""
        collection = self._collections[resource]
        if not owned:
            obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        namespace = metadata.get("namespace", "") if collection.info.namespaced else ""
        if collection.info.namespaced:
            metadata["namespace"] = namespace = namespace or "default"
        key = (namespace, metadata["name"])
        previous = collection.objects.get(key)
        if previous is None:
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", _now())
            metadata["generation"] = 1
            kind = "ADDED"
        else:
            old = previous.obj
            metadata.setdefault("uid", old["metadata"]["uid"])
            metadata.setdefault("creationTimestamp", old["metadata"].get("creationTimestamp"))
            generation = old["metadata"].get("generation", 1)
            metadata["generation"] = generation + (obj.get("spec") != old.get("spec"))
        obj.setdefault("kind", collection.info.kind)
        obj.setdefault("apiVersion", collection.info.api_version)
        self._rv += 1
        metadata["resourceVersion"] = encode_rv(self._rv)
        collection.objects[key] = _Stored(obj, json.dumps(obj, separators=(",", ":")))
        if not silent:
            self._record_event(collection, kind, obj)
        return obj if owned else copy.deepcopy(obj)

    def _record_event(self, collection: _Collection, kind: str, obj: dict[str, Any]) -> None:
        namespace = obj["metadata"].get("namespace", "")
        line = f'{{"type":"{kind}","object":{json.dumps(obj, separators=(",", ":"))}}}'
        collection.history.append((self._rv, kind, namespace, line))
        for watcher in collection.watchers:
            if watcher.namespace in (None, namespace):
                watcher.queue.put_nowait(("line", line))

    def _take_fault(self, resource: str, verb: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.resource in (resource, "any") and fault.verb in (verb, "any"):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        params = dict(request.query)
        record = RequestRecord(time.monotonic(), request.method, "", "other", params)
        with self._lock:
            self.requests.append(record)
        response = await self._route(request, path, params, record)
        record.status = response.status
        return response

    async def _route(
        self, request: web.Request, path: str, params: dict[str, str], record: RequestRecord
    ) -> web.StreamResponse:
        prefix = next((p for p in _PREFIXES if path.startswith(p + "/")), None)
        if prefix is None:
            return web.json_response(_status(404, "NotFound", path), status=404)
        parts = path[len(prefix) + 1 :].split("/")
        namespace: str | None = None
        # namespaces/NS/RESOURCE[/NAME[/SUB]]; else RESOURCE[/NAME[/SUB]] (/api/v1/namespaces/X
        # is the namespace X itself).
        if parts[0] == "namespaces" and len(parts) >= 3:
            namespace, parts = parts[1], parts[2:]
        if len(parts) > 3:
            return web.json_response(_status(404, "NotFound", path), status=404)
        resource, name, subresource = [*parts, "", ""][:3]
        info = RESOURCES.get(resource)
        if (
            info is None
            or info.prefix != prefix
            or (namespace is not None and not info.namespaced)
            or (subresource and (subresource != "status" or resource not in STATUS_SUBRESOURCE))
        ):
            return web.json_response(_status(404, "NotFound", path), status=404)
        record.resource, record.name, record.subresource = resource, name, subresource
        watching = params.get("watch") in ("1", "true")
        if request.method == "POST" and not name:
            record.verb = "create"
        elif request.method == "GET":
            record.verb = "get" if name else "watch" if watching else "list"
        elif request.method == "PUT" and name:
            record.verb = "update"
        elif request.method == "PATCH" and name:
            record.verb = "patch"
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        with self._lock:
            user = "tester" if bearer == self.token else self.users.get(bearer)
        if self.token is not None and user is None:
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        record.user = user or ""
        fault = self._take_fault(resource, record.verb)
        if fault is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
            return web.json_response(
                _status(fault.status, "Injected", f"injected {fault.status}"),
                status=fault.status,
                headers=headers,
            )
        if record.verb == "create":
            return await self._create(request, resource, namespace)
        if record.verb in ("get", "update", "patch"):
            return await self._one(request, record.verb, resource, namespace or "", name)
        if record.verb == "list":
            held = self._held_lists.get(resource)
            if held is not None:
                await held.wait()
            return self._list(resource, namespace, params)
        if record.verb == "watch":
            return await self._watch(request, resource, namespace, params)
        return web.json_response(_status(405, "MethodNotAllowed", "no"), status=405)

    async def _create(
        self, request: web.Request, resource: str, namespace: str | None
    ) -> web.StreamResponse:
        body = await request.json()
        if namespace is not None:
            body.setdefault("metadata", {})["namespace"] = namespace
        collection = self._collections[resource]
        key = (body["metadata"].get("namespace", ""), body["metadata"].get("name", ""))
        if key in collection.objects:
            return web.json_response(
                _status(409, "AlreadyExists", f"{resource} {key[1]} already exists"), status=409
            )
        stored = self._put(resource, body, "ADDED", False)
        if resource == "events":
            with self._lock:
                self.events_posted.append(stored)
        return web.json_response(stored, status=201)

    async def _one(
        self, request: web.Request, verb: str, resource: str, namespace: str, name: str
    ) -> web.Response:
        """GET, PUT (whole object, optimistic concurrency) or merge PATCH of `.status`."""
        collection = self._collections[resource]
        stored = collection.objects.get((namespace, name))
        if stored is None:
            message = f'{resource} "{name}" not found'
            return web.json_response(_status(404, "NotFound", message), status=404)
        if verb == "get":
            return web.Response(text=stored.text, content_type="application/json")
        if verb == "patch" and request.content_type != MERGE_PATCH:
            return web.json_response(
                _status(415, "UnsupportedMediaType", request.content_type), status=415
            )
        body = await request.json()
        sent = (body.get("metadata") or {}).get("resourceVersion")
        current = stored.obj["metadata"]["resourceVersion"]
        if (verb == "update" or sent is not None) and sent != current:
            message = (
                f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again"
            )
            return web.json_response(_status(409, "Conflict", message), status=409)
        if verb == "update":
            body.setdefault("metadata", {}).update(name=name)
            if collection.info.namespaced:
                body["metadata"]["namespace"] = namespace
            obj = body
        else:  # the status subresource: only .status changes
            obj = copy.deepcopy(stored.obj)
            obj["status"] = _merge_patch(obj.get("status"), body.get("status"))
        return web.json_response(self._put(resource, obj, "MODIFIED", False))

    def _list(self, resource: str, namespace: str | None, params: dict[str, str]) -> web.Response:
        collection = self._collections[resource]
        limit = int(params.get("limit") or 0)
        token = params.get("continue")
        if token:
            expired = self._expire_next_continue
            self._expire_next_continue = False
            snapshot_id, _, offset_text = base64.b64decode(token).decode().partition(":")
            snapshot = self._snapshots.get(snapshot_id)
            if expired or snapshot is None:
                self._snapshots.pop(snapshot_id, None)
                return web.json_response(
                    _status(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter.",
                    ),
                    status=410,
                )
            version, texts = snapshot
            offset = int(offset_text)
        else:
            version = self._rv
            texts = [
                stored.text
                for key, stored in sorted(collection.objects.items())
                if namespace is None or key[0] == namespace
            ]
            offset = 0
            snapshot_id = uuid.uuid4().hex
        end = len(texts) if limit <= 0 else min(len(texts), offset + limit)
        metadata: dict[str, Any] = {"resourceVersion": encode_rv(version)}
        if end < len(texts):
            self._snapshots[snapshot_id] = (version, texts)
            metadata["continue"] = base64.b64encode(f"{snapshot_id}:{end}".encode()).decode()
            metadata["remainingItemCount"] = len(texts) - end
        else:
            self._snapshots.pop(snapshot_id, None)
        info = collection.info
        body = (
            f'{{"kind":{json.dumps(info.kind + "List")},'
            f'"apiVersion":{json.dumps(info.api_version)},'
            f'"metadata":{json.dumps(metadata)},'
            f'"items":[{",".join(texts[offset:end])}]}}'
        )
        return web.Response(text=body, content_type="application/json")

    async def _watch(
        self, request: web.Request, resource: str, namespace: str | None, params: dict[str, str]
    ) -> web.StreamResponse:
        collection = self._collections[resource]
        requested = params.get("resourceVersion", "")
        lines: list[str] = []
        if requested in ("", "0"):
            start = self._rv
            lines = [
                f'{{"type":"ADDED","object":{stored.text}}}'
                for key, stored in sorted(collection.objects.items())
                if namespace is None or key[0] == namespace
            ]
        else:
            decoded = decode_rv(requested)
            if decoded is None:
                return web.json_response(
                    _status(400, "BadRequest", f"invalid resourceVersion {requested!r}"),
                    status=400,
                )
            start = decoded
        timeout = float(params.get("timeoutSeconds") or 1800)
        if self.watch_max_seconds is not None:
            timeout = min(timeout, self.watch_max_seconds)
        gone = _status(
            410, "Expired", f"too old resource version: {requested} ({encode_rv(self._compacted)})"
        )
        expired = start < self._compacted or self.expire_every_watch
        if expired and self.compaction_error == "http":
            return web.json_response(gone, status=410)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            if expired:
                error = json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n"
                await response.write(error)
                await response.write_eof()
                return response
        except ConnectionError:
            return response  # the client went away before the stream began
        watcher = _Watcher(namespace, params.get("allowWatchBookmarks") in ("1", "true"))
        for line in lines:
            watcher.queue.put_nowait(("line", line))
        for version, _, event_namespace, line in collection.history:
            if version > start and namespace in (None, event_namespace):
                watcher.queue.put_nowait(("line", line))
        collection.watchers.add(watcher)
        try:
            await self._serve_watch(request, response, watcher, timeout)
        except (ConnectionError, RuntimeError):
            return response  # the client went away
        finally:
            collection.watchers.discard(watcher)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    async def _serve_watch(
        self, request: web.Request, response: web.StreamResponse, watcher: _Watcher, timeout: float
    ) -> None:
        deadline = self._loop.time() + timeout
        while True:
            if watcher.stalled:
                await self._stall(request, watcher)
                return
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    kind, payload = await watcher.queue.get()
            except TimeoutError:
                return
            if kind == "close":
                return
            if kind == "stall":
                continue
            if kind == "abort":
                await response.write(b'{"type":"MODIFIED","object":{"kind":"Po')
                await asyncio.sleep(0.01)
                self._abort(request)
                raise ConnectionError("aborted")
            if kind == "raw":
                await response.write(payload)
                continue
            data = payload.encode() + b"\n"
            fault, watcher.next_event_fault = watcher.next_event_fault, None
            if fault == "abort_mid":
                await response.write(data[: len(data) // 2])
                await asyncio.sleep(0.01)
                self._abort(request)
                raise ConnectionError("aborted mid-event")
            if fault == "split":
                for piece in _split_inside_utf8(data):
                    await response.write(piece)
                    await asyncio.sleep(0.002)
                continue
            await response.write(data)

    async def _stall(self, request: web.Request, watcher: _Watcher) -> None:
        """Send nothing (events are swallowed) until the client leaves, or an abort or the
        server's stop ends it."""
        while not self._stopping.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionError("stalled watch abandoned by the client")
            try:
                async with asyncio.timeout(0.05):
                    kind, _ = await watcher.queue.get()
            except TimeoutError:
                continue
            if kind == "abort":
                self._abort(request)
                raise ConnectionError("aborted")
            if kind == "close":
                return

    @staticmethod
    def _abort(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _split_inside_utf8(data: bytes, pieces: int = 40) -> list[bytes]:
    """Cut `data` into many pieces, one cut falling inside a multi-byte UTF-8 character."""
    cuts = {len(data) * i // pieces for i in range(1, pieces)}
    multibyte = next((i for i, byte in enumerate(data) if byte >= 0xC0), None)
    if multibyte is not None:
        cuts.add(multibyte + 1)  # between the lead byte and its continuation
    out, last = [], 0
    for cut in sorted(cuts):
        if last < cut < len(data):
            out.append(data[last:cut])
            last = cut
    out.append(data[last:])
    return out


# --------------------------------------------------------------------------------------------
# Object builders
# --------------------------------------------------------------------------------------------


def pod(
    name: str,
    ip: str | None,
    *,
    namespace: str = "default",
    labels: dict[str, str] | None = None,
    uid: str | None = None,
    phase: str = "Running",
    owner: tuple[str, str] | None = None,
    service_account: str = "default",
    node: str = "node-1",
    host_network: bool = False,
    ips: list[str] | None = None,
    terminating: bool = False,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels or {}}
    if uid is not None:
        metadata["uid"] = uid
    if owner is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "apps/v1" if owner[0] != "Job" else "batch/v1",
                "kind": owner[0],
                "name": owner[1],
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{owner}")),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    if terminating:
        metadata["deletionTimestamp"] = _now()
        metadata["deletionGracePeriodSeconds"] = 30
    if annotations:
        metadata["annotations"] = annotations
    status: dict[str, Any] = {"phase": phase, "hostIP": "10.0.0.1"}
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": address} for address in (ips or [ip])]
    return {
        "metadata": metadata,
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "hostNetwork": host_network,
            "containers": [{"name": "app", "image": "registry.example/app:1.0"}],
        },
        "status": status,
    }


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def job(name: str, *, namespace: str, cronjob: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if cronjob is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "batch/v1",
                "kind": "CronJob",
                "name": cronjob,
                "uid": str(uuid.uuid4()),
                "controller": True,
            }
        ]
    return {"metadata": metadata, "spec": {"template": {}}}


def generated_pod(index: int) -> dict[str, Any]:
    """Pod number `index` of a large cluster: 10.x.y.z addresses, 50 pods per Deployment, and
    the size of a real pod object (a few KiB with spec and status)."""
    deployment = f"svc-{index // 50}"
    template_hash = f"{(index // 50) * 7919 % 0xFFFFFFF:07x}"
    ip = f"10.{(index >> 16) & 0xFF}.{(index >> 8) & 0xFF}.{index & 0xFF}"
    obj = pod(
        f"{deployment}-{template_hash}-{index:05x}",
        ip,
        namespace=f"team-{index % 200}",
        labels={
            "app.kubernetes.io/name": deployment,
            "app.kubernetes.io/part-of": "bench",
            "pod-template-hash": template_hash,
        },
        uid=str(uuid.UUID(int=index + 1)),
        owner=("ReplicaSet", f"{deployment}-{template_hash}"),
        service_account=deployment,
        node=f"node-{index % 5000}",
    )
    obj["spec"]["containers"][0].update(
        {
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "env": [{"name": f"VAR_{i}", "value": "x" * 20} for i in range(8)],
            "volumeMounts": [
                {"name": "kube-api-access", "mountPath": "/var/run/secrets", "readOnly": True}
            ],
        }
    )
    obj["status"]["conditions"] = [
        {"type": t, "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}
        for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
    ]
    return obj


def _serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="serve generated pods until stdin closes")
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    with FakeKube(Path(args.dir)) as fake:
        fake.seed("namespaces", (namespace(f"team-{i}") for i in range(200)))
        fake.seed("pods", (generated_pod(i) for i in range(args.pods)))
        print(json.dumps({"kubeconfig": str(fake.kubeconfig()), "port": fake.port}), flush=True)
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(_serve_main(sys.argv[1:]))
