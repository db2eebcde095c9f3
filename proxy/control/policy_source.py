"""Keep the policy in force: load policy files, watch them, swap in a new Engine on change.

A reload that fails keeps the last good engine in force (fail closed, never fail open: the
previous policy, not "no policy"), and reports every issue in the log, in
`outgate_policy_last_reload_success` and in `PolicyStore.last_error` (shown by /readyz).

Files are polled rather than watched with inotify: polling sees ConfigMap updates (an atomic
symlink swap in a hidden directory), network filesystems and editors that replace files, with
nothing but `stat`. The fingerprint of every file is (path, mtime_ns, size, inode), plus the
set of files and any missing paths.

Policies come from sources (`PolicyStore.set_source`): the files, and the ClusterEgressPolicy /
EgressPolicy objects of the cluster (proxy.control.kube.policies). Every change of any source
compiles all of them, merged, into the next revision. When two sources define a policy of the
same kind, namespace and name, the files win (the operator's config is authoritative) and the
cluster's object is reported as left out.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import structlog

from proxy.control.watched_file import poll_for_changes
from proxy.core.identity import Workload
from proxy.core.policy.engine import Decision, Engine
from proxy.core.policy.loader import load_paths, policy_files
from proxy.core.policy.model import Action, Destination, Policy, PolicyKind
from proxy.errors import ConfigError
from proxy.metrics import POLICY_LAST_RELOAD_OK, POLICY_RELOADS, POLICY_REVISION, POLICY_RULES

log = structlog.get_logger(__name__)

# Half a second: a saved file is in force well within the "about two seconds" an operator
# expects, and stat-ing a directory of policy files twice a second costs nothing measurable.
DEFAULT_POLL_INTERVAL = 0.5

_Fingerprint = tuple[tuple[str, int, int, int], ...]

# Sources merge in this order; on a clash of kind/namespace/name the earlier one wins.
FILE_SOURCE = "files"
KUBERNETES_SOURCE = "kubernetes"
_SOURCE_ORDER = (FILE_SOURCE, KUBERNETES_SOURCE)


class PolicyStore:
    """Holds the Engine in force. Until the first successful load it holds an empty engine that
    denies everything and `loaded` is False (the proxy reports not ready)."""

    def __init__(self) -> None:
        self._engine = Engine.compile((), default_action=Action.DENY, revision=0)
        self._loaded = False
        self._last_error: ConfigError | None = None
        self._sources: dict[str, tuple[Policy, ...]] = {}
        self._default_action = Action.DENY
        # The file watcher reloads in a worker thread, the cluster source on the event loop.
        self._lock = threading.Lock()
        self._merge_listeners: list[Callable[[str], None]] = []

    def on_merge(self, listener: Callable[[str], None]) -> None:
        """Call `listener(source)` after every `set_source`, on the caller's thread: a source
        whose policies another source shadows learns that the set of shadowed ones may have
        changed (the cluster source re-judges its objects when the files change)."""
        self._merge_listeners.append(listener)

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def last_error(self) -> ConfigError | None:
        """The error of the last load when it failed; None after a successful one."""
        return self._last_error

    @property
    def revision(self) -> int:
        return self._engine.revision

    def install(self, engine: Engine) -> None:
        self._engine = engine
        self._loaded = True
        self._last_error = None

    def record_failure(self, error: ConfigError) -> None:
        self._last_error = error

    def set_source(
        self, source: str, policies: Iterable[Policy], *, default_action: Action | None = None
    ) -> tuple[Engine, list[tuple[Policy, Policy]]]:
        """Replace one source's policies, compile every source merged into revision+1 and
        install it. Returns the engine and the (left out, defined first) pairs of policies an
        earlier source already defines. Only the file source clears `last_error` (a failed
        file reload stays visible while cluster policies change)."""
        with self._lock:
            self._sources[source] = tuple(policies)
            if default_action is not None:
                self._default_action = default_action
            merged: dict[tuple[PolicyKind, str, str], Policy] = {}
            shadowed: list[tuple[Policy, Policy]] = []
            rank = {name: index for index, name in enumerate(_SOURCE_ORDER)}
            for name in sorted(self._sources, key=lambda n: rank.get(n, len(rank))):
                for policy in self._sources[name]:
                    first = merged.setdefault(policy.identity, policy)
                    if first is not policy:
                        shadowed.append((policy, first))
            engine = Engine.compile(
                merged.values(),
                default_action=self._default_action,
                revision=self._engine.revision + 1,
            )
            self._engine = engine
            self._loaded = True
            if source == FILE_SOURCE:
                self._last_error = None
        for listener in self._merge_listeners:
            listener(source)
        return engine, shadowed

    def decide(
        self, workload: Workload, destination: Destination, *, explain: bool = False
    ) -> Decision:
        """`Decider` for the data plane: always the engine in force at the time of the call."""
        return self._engine.decide(workload, destination, explain=explain)


class PolicyFileWatcher:
    """Loads policy files into a PolicyStore and reloads them when they change."""

    def __init__(
        self,
        store: PolicyStore,
        paths: Sequence[str | Path],
        *,
        default_action: Action,
        interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        if default_action is Action.PASS:
            raise ValueError("the default action is Allow or Deny")
        self.store = store
        self.paths = tuple(Path(path) for path in paths)
        self.default_action = default_action
        self.interval = interval
        self._fingerprint: _Fingerprint | None = None

    def load_initial(self) -> None:
        """First load, synchronous. Raises ConfigError when it fails: the CLI exits on it."""
        if not self.reload():
            error = self.store.last_error
            assert error is not None  # reload() records it on every failure
            raise error

    def reload(self) -> bool:
        """Re-read every path; on success compile revision+1 and swap it in. On failure keep the
        engine in force, log every issue and return False."""
        fingerprint = self._take_fingerprint()  # before reading: a later write triggers again
        self._fingerprint = fingerprint
        try:
            policies = load_paths(self.paths)
        except ConfigError as error:
            POLICY_RELOADS.labels(result="failure").inc()
            POLICY_LAST_RELOAD_OK.set(0)
            log.error(
                "policy_reload_failed",
                issues=[issue.render() for issue in error.issues],
                revision_in_force=self.store.revision,
                loaded=self.store.loaded,
            )
            self.store.record_failure(error)  # last: whoever sees the store change sees the rest
            return False
        engine, _ = self.store.set_source(FILE_SOURCE, policies, default_action=self.default_action)
        POLICY_RELOADS.labels(result="success").inc()
        POLICY_LAST_RELOAD_OK.set(1)
        POLICY_REVISION.set(engine.revision)
        POLICY_RULES.set(engine.rule_count)
        log.info(
            "policy_loaded",
            revision=engine.revision,
            digest=engine.digest,
            policies=len(engine.policies),
            rules=engine.rule_count,
        )
        return True

    def changed(self) -> bool:
        """Whether any watched file was added, removed or modified since the last (re)load."""
        return self._take_fingerprint() != self._fingerprint

    async def run(self) -> None:
        """Poll every `interval` seconds and reload on change, until cancelled (a large policy
        set takes a while to compile: that happens off the event loop)."""
        await poll_for_changes(
            self.interval, self.changed, self.reload, error_event="policy_watch_error"
        )

    def _take_fingerprint(self) -> _Fingerprint:
        files, issues = policy_files(self.paths)
        entries: list[tuple[str, int, int, int]] = []
        for path in files:
            try:
                stat = os.stat(path)
            except OSError:
                entries.append((str(path), -1, -1, -1))
                continue
            entries.append((str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino))
        entries.extend((issue.file, -1, -1, -1) for issue in issues)  # a missing path
        return tuple(entries)
