"""PolicyFileWatcher on real files: an edit is in force within ~2 s, a broken file keeps the last
good engine and says so (store, log, metrics), and fixing the file recovers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from proxy.control.policy_source import PolicyFileWatcher, PolicyStore
from proxy.core.hosts import parse_host
from proxy.core.identity import Workload, WorkloadKind
from proxy.core.policy.model import Action, Destination
from proxy.errors import ConfigError, Reason
from proxy.metrics import REGISTRY
from tests.support.waiting import eventually

DEADLINE = 2.0  # the claim under test: an edit is in force within 2 s
POLL = 0.05
WORKLOAD = Workload(
    kind=WorkloadKind.POD, namespace="payments", name="api-1", labels={"app": "api"}
)


def policy_allowing(*names: str) -> str:
    to = ", ".join(f"{{fqdn: {name}}}" for name in names)
    return (
        "apiVersion: outgate.dev/v1alpha1\n"
        "kind: EgressPolicy\n"
        "metadata: {name: api, namespace: payments}\n"
        "spec:\n"
        "  podSelector: {matchLabels: {app: api}}\n"
        "  rules:\n"
        f"    - {{name: allowed, action: Allow, to: [{to}]}}\n"
    )


def allowed(store: PolicyStore, host: str) -> bool:
    destination = Destination(host=parse_host(host), port=443)
    return store.decide(WORKLOAD, destination).allowed


def metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def running(watcher: PolicyFileWatcher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(watcher.run(), name="policy-watcher")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_edit_break_and_fix_a_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "payments.yaml"
    path.write_text(policy_allowing("a.example"))
    store = PolicyStore()
    watcher = PolicyFileWatcher(store, [tmp_path], default_action=Action.DENY, interval=POLL)
    successes = metric("outgate_policy_reloads_total", result="success")
    failures = metric("outgate_policy_reloads_total", result="failure")

    watcher.load_initial()
    assert (store.loaded, store.revision, store.last_error) == (True, 1, None)
    assert allowed(store, "a.example") and not allowed(store, "b.example")
    assert metric("outgate_policy_revision") == 1
    assert metric("outgate_policy_rules") == 1
    assert metric("outgate_policy_last_reload_success") == 1

    async with running(watcher):
        # An edit is in force within the deadline.
        path.write_text(policy_allowing("a.example", "b.example"))
        await eventually(lambda: allowed(store, "b.example"), timeout=DEADLINE)
        assert store.revision == 2
        assert metric("outgate_policy_revision") == 2

        # A broken file: the old engine stays, the error is recorded, logged and counted.
        with capture_logs() as logs:
            path.write_text(policy_allowing("a.example", "b.example").replace("Allow", "Alow"))
            await eventually(lambda: store.last_error is not None, timeout=DEADLINE)
        assert allowed(store, "b.example")
        assert store.revision == 2
        assert store.loaded
        error = store.last_error
        assert error is not None
        assert [(i.file, i.document, i.path) for i in error.issues] == [
            (str(path), 1, "spec.rules[0].action")
        ]
        assert metric("outgate_policy_last_reload_success") == 0
        assert metric("outgate_policy_revision") == 2
        assert metric("outgate_policy_reloads_total", result="failure") == failures + 1
        failed = [entry for entry in logs if entry["event"] == "policy_reload_failed"]
        assert len(failed) == 1
        assert failed[0]["log_level"] == "error"
        assert failed[0]["issues"] == [issue.render() for issue in error.issues]
        assert "did you mean 'Allow'?" in failed[0]["issues"][0]

        # Fixing the file recovers.
        path.write_text(policy_allowing("c.example"))
        await eventually(lambda: store.last_error is None, timeout=DEADLINE)
        assert store.revision == 3
        assert allowed(store, "c.example") and not allowed(store, "b.example")
        assert metric("outgate_policy_last_reload_success") == 1
        assert metric("outgate_policy_reloads_total", result="success") == successes + 3


async def test_adding_and_removing_files_reloads(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(policy_allowing("a.example"))
    store = PolicyStore()
    watcher = PolicyFileWatcher(store, [tmp_path], default_action=Action.ALLOW, interval=POLL)
    watcher.load_initial()
    async with running(watcher):
        (tmp_path / "b.yaml").write_text(
            policy_allowing("b.example").replace("name: api,", "name: second,")
        )
        await eventually(lambda: store.revision == 2, timeout=DEADLINE)
        assert [policy.name for policy in store.engine.policies] == ["api", "second"]
        (tmp_path / "a.yaml").unlink()
        (tmp_path / "b.yaml").unlink()
        await eventually(lambda: store.revision == 3, timeout=DEADLINE)
        assert store.engine.policies == ()
        assert store.decide(
            WORKLOAD, Destination(host=parse_host("x.example"), port=443)
        ).reason is (Reason.DEFAULT_ALLOW)


async def test_an_unchanged_tree_is_not_reloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.yaml").write_text(policy_allowing("a.example"))
    store = PolicyStore()
    watcher = PolicyFileWatcher(store, [tmp_path], default_action=Action.DENY, interval=POLL)
    watcher.load_initial()
    answers: list[bool] = []
    check = watcher.changed

    def recorded_check() -> bool:
        answers.append(check())
        return answers[-1]

    monkeypatch.setattr(watcher, "changed", recorded_check)
    async with running(watcher):
        await eventually(lambda: len(answers) >= 5)  # five polls saw the tree
    assert not any(answers)
    assert store.revision == 1


def test_a_failed_first_load_raises_and_leaves_the_store_not_loaded(tmp_path: Path) -> None:
    store = PolicyStore()
    watcher = PolicyFileWatcher(store, [tmp_path / "missing"], default_action=Action.DENY)
    with pytest.raises(ConfigError) as caught:
        watcher.load_initial()
    assert "does not exist" in caught.value.issues[0].message
    assert store.loaded is False
    assert store.last_error is caught.value
    assert store.revision == 0
    # Until a policy loads, the store denies everything.
    assert not allowed(store, "a.example")
    assert metric("outgate_policy_last_reload_success") == 0


async def test_a_path_that_appears_later_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "late.yaml"
    store = PolicyStore()
    watcher = PolicyFileWatcher(store, [path], default_action=Action.DENY, interval=POLL)
    with pytest.raises(ConfigError):
        watcher.load_initial()
    async with running(watcher):
        path.write_text(policy_allowing("a.example"))
        await eventually(lambda: store.loaded, timeout=DEADLINE)
    assert allowed(store, "a.example")
    assert store.revision == 1
