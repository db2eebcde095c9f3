"""The reflector against the fake API server: paging, bookmarks, compaction and relists,
expired continue tokens, faults of every kind, and what they must not cause (duplicate
effects, stale IPs, request spins)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest

from proxy.control.kube.reflector import Reflector
from tests.kube.conftest import FAST, Informers, metric
from tests.support.fakekube import FakeKube, decode_rv, namespace, pod
from tests.support.waiting import eventually


def pods_ip(n: int) -> str:
    return f"10.1.{n // 250}.{n % 250 + 1}"


def seed_pods(fake: FakeKube, count: int) -> None:
    fake.seed("pods", (pod(f"p{n}", pods_ip(n), uid=f"u{n}") for n in range(count)))
    fake.create("namespaces", namespace("default"))


async def test_initial_paged_sync_of_1253_pods(fake: FakeKube) -> None:
    seed_pods(fake, 1253)
    server_version = fake.resource_version
    async with Informers(fake) as informers:
        await informers.synced()
        assert len(informers.plane.index) == 1253
        assert all(informers.lookup(pods_ip(n)).name == f"p{n}" for n in range(1253))
        lists = fake.requests_for("pods", "list")
        assert [r.params["limit"] for r in lists] == ["500", "500", "500"]
        assert "continue" not in lists[0].params
        assert lists[1].params["continue"] != lists[2].params["continue"]
        watch = fake.requests_for("pods", "watch")[0].params
        assert watch["resourceVersion"] == server_version
        assert watch["allowWatchBookmarks"] == "true"
        assert 120 <= int(watch["timeoutSeconds"]) < 240  # randomised in [t, 2t)
        assert metric("outgate_kube_synced", resource="pods") == 1
        assert metric("outgate_kube_objects", resource="pods") == 1253
        assert 0 <= metric("outgate_kube_seconds_since_last_event", resource="pods") < 60


async def test_resource_versions_are_opaque_strings_passed_back_verbatim(fake: FakeKube) -> None:
    seed_pods(fake, 3)
    async with Informers(fake) as informers:
        await informers.synced()
        created = fake.create("pods", pod("new", "10.9.0.1"))
        version = created["metadata"]["resourceVersion"]
        assert not version.isdigit() and decode_rv(version) is not None
        await eventually(lambda: informers.pods.resource_version == version)
        fake.abort_watches("pods")
        await eventually(lambda: len(fake.requests_for("pods", "watch")) == 2)
        assert fake.requests_for("pods", "watch")[1].params["resourceVersion"] == version


async def test_progress_by_bookmarks_only_survives_a_compaction(fake: FakeKube) -> None:
    seed_pods(fake, 3)
    async with Informers(fake) as informers:
        await informers.synced()
        listed_at = informers.pods.resource_version
        bookmarks = metric("outgate_kube_watch_events_total", resource="pods", type="BOOKMARK")
        fake.bump(40)  # the cluster moves on; nothing happens to pods
        fake.bookmark("pods")
        await eventually(lambda: informers.pods.resource_version == fake.resource_version)
        assert informers.pods.resource_version != listed_at
        assert (
            metric("outgate_kube_watch_events_total", resource="pods", type="BOOKMARK")
            == bookmarks + 1
        )
        bookmarked = informers.pods.resource_version
        fake.compact()  # the listed version is now too old; the bookmarked one is not
        fake.abort_watches("pods")
        await eventually(lambda: len(fake.requests_for("pods", "watch")) == 2)
        await informers.watching("pods")
        assert fake.requests_for("pods", "watch")[1].params["resourceVersion"] == bookmarked
        fake.create("pods", pod("late", "10.9.0.2"))
        await eventually(lambda: informers.lookup("10.9.0.2").name == "late")
        assert len(fake.requests_for("pods", "list")) == 1  # no relist was needed


@pytest.mark.parametrize("style", ["event", "http"])
async def test_compaction_410_relists_and_synthesises_the_deletions_it_missed(
    fake: FakeKube, style: str
) -> None:
    fake.compaction_error = style
    seed_pods(fake, 3)
    async with Informers(fake) as informers:
        await informers.synced()
        expired = metric("outgate_kube_relists_total", resource="pods", reason="expired")
        fake.stall_watches("pods")  # from here on our watch hears nothing
        fake.delete("pods", "default", "p0")
        fake.patch("pods", "default", "p1", lambda o: o["status"].update(podIP="10.9.9.9"))
        fake.patch(
            "pods", "default", "p1", lambda o: o["status"].update(podIPs=[{"ip": "10.9.9.9"}])
        )
        fake.compact()
        fake.abort_watches("pods")
        await eventually(lambda: len(fake.requests_for("pods", "list")) == 2)
        await informers.watching("pods")
        assert metric("outgate_kube_relists_total", resource="pods", reason="expired") == (
            expired + 1
        )
        assert informers.lookup(pods_ip(0)).is_unknown  # deleted while we were away
        assert informers.lookup(pods_ip(1)).is_unknown  # p1's old IP: no stale entry
        assert informers.lookup("10.9.9.9").name == "p1"
        assert informers.lookup(pods_ip(2)).name == "p2"
        assert len(informers.plane.index) == 2
        # Connections are closed for the IPs that left a pod, and only for those.
        assert sorted((str(ip), name) for ip, name in informers.gone) == [
            (pods_ip(0), "default/p0"),
            (pods_ip(1), "default/p1"),
        ]


async def test_a_deletion_only_a_relist_reveals(fake: FakeKube) -> None:
    seed_pods(fake, 2)
    async with Informers(fake) as informers:
        await informers.synced()
        fake.delete("pods", "default", "p0", silent=True)  # gone, and no event says so
        fake.create("pods", pod("marker", "10.9.0.99"))  # an event after the deletion
        await eventually(lambda: informers.lookup("10.9.0.99").name == "marker")
        assert informers.lookup(pods_ip(0)).name == "p0"
        # One more unseen write, so the version we hold is older than the compaction.
        fake.patch("pods", "default", "marker", lambda o: None, silent=True)
        fake.compact()  # the only way a client learns: its version expires, it relists
        fake.abort_watches("pods")
        await eventually(lambda: informers.lookup(pods_ip(0)).is_unknown)
        assert informers.gone == [(informers.gone[0][0], "default/p0")]
        assert str(informers.gone[0][0]) == pods_ip(0)
        assert informers.lookup(pods_ip(1)).name == "p1"


async def test_an_expired_continue_token_restarts_the_list(fake: FakeKube) -> None:
    seed_pods(fake, 1200)
    fake.expire_next_continue()
    restarts = metric("outgate_kube_relists_total", resource="pods", reason="continue_expired")
    async with Informers(fake) as informers:
        await informers.synced()
        lists = fake.requests_for("pods", "list")
        assert [(r.status, "continue" in r.params) for r in lists] == [
            (200, False),
            (410, True),  # expired: start over from the first page
            (200, False),
            (200, True),
            (200, True),
        ]
        assert len(informers.plane.index) == 1200
        assert (
            metric("outgate_kube_relists_total", resource="pods", reason="continue_expired")
            == restarts + 1
        )


def count_applies(reflector: Reflector) -> dict[str, int]:
    """Wrap the reflector's sink so every apply is counted by pod name."""
    counts: dict[str, int] = {}
    sink = reflector.sink
    original = sink.apply

    def counting(obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        counts[name] = counts.get(name, 0) + 1
        original(obj)

    sink.apply = counting  # type: ignore[method-assign]
    return counts


async def test_abort_mid_event_resumes_from_the_last_version_without_duplicate_effects(
    fake: FakeKube,
) -> None:
    seed_pods(fake, 1)
    async with Informers(fake) as informers:
        await informers.synced()
        counts = count_applies(informers.pods)
        errors = metric("outgate_kube_watch_restarts_total", resource="pods", reason="error")
        first = fake.create("pods", pod("first", "10.9.0.1"))
        await eventually(lambda: informers.lookup("10.9.0.1").name == "first")
        fake.fault_next_event("pods", "abort_mid")
        fake.create("pods", pod("second", "10.9.0.2"))  # half of it, then the connection dies
        await eventually(lambda: informers.lookup("10.9.0.2").name == "second")
        watches = fake.requests_for("pods", "watch")
        assert len(watches) == 2
        assert watches[1].params["resourceVersion"] == first["metadata"]["resourceVersion"]
        assert counts == {"first": 1, "second": 1}
        assert len(fake.requests_for("pods", "list")) == 1
        assert (
            metric("outgate_kube_watch_restarts_total", resource="pods", reason="error")
            == errors + 1
        )
        assert informers.gone == []


async def test_a_stalled_watch_is_replaced_after_the_inactivity_timeout(fake: FakeKube) -> None:
    seed_pods(fake, 1)
    tuning = dataclasses.replace(FAST, inactivity_timeout=0.6)
    async with Informers(fake, tuning=tuning) as informers:
        await informers.synced()
        inactive = metric("outgate_kube_watch_restarts_total", resource="pods", reason="inactive")
        fake.stall_watches("pods")
        fake.create("pods", pod("during-stall", "10.9.0.3"))
        await eventually(lambda: informers.lookup("10.9.0.3").name == "during-stall")
        assert (
            metric("outgate_kube_watch_restarts_total", resource="pods", reason="inactive")
            >= inactive + 1
        )
        assert len(fake.requests_for("pods", "list")) == 1


async def test_very_short_watches_back_off_instead_of_spinning(fake: FakeKube) -> None:
    seed_pods(fake, 1)
    fake.watch_max_seconds = 0  # every watch ends at once, with nothing in it
    async with Informers(fake):
        await eventually(lambda: len(fake.requests_for("pods", "watch")) >= 6)
        watches = fake.requests_for("pods", "watch")
    # Five backoffs, each at least half of 50 ms (equal jitter; while the failures are young
    # the outage bound keeps each step at 50 ms), take at least 0.125 s; a spin would make six
    # watches in a few milliseconds.
    assert watches[5].at - watches[0].at >= 0.12, [w.at for w in watches]
    assert metric("outgate_kube_watch_restarts_total", resource="pods", reason="too_short") >= 2


async def test_a_normal_watch_timeout_rewatches_at_once_from_the_last_version(
    fake: FakeKube,
) -> None:
    seed_pods(fake, 1)
    fake.watch_max_seconds = 1.2
    closed = metric("outgate_kube_watch_restarts_total", resource="pods", reason="closed")
    short = metric("outgate_kube_watch_restarts_total", resource="pods", reason="too_short")
    async with Informers(fake) as informers:
        await informers.synced()
        created = fake.create("pods", pod("x", "10.9.0.4"))
        await eventually(lambda: len(fake.requests_for("pods", "watch")) >= 2, timeout=10)
        watches = fake.requests_for("pods", "watch")
        assert watches[1].params["resourceVersion"] == created["metadata"]["resourceVersion"]
        assert len(fake.requests_for("pods", "list")) == 1
    # A clean close, not a failure: the next watch is made at once, without backoff.
    assert metric("outgate_kube_watch_restarts_total", resource="pods", reason="closed") > closed
    assert metric("outgate_kube_watch_restarts_total", resource="pods", reason="too_short") == (
        short
    )


async def test_401_rereads_the_token_file_and_succeeds(fake: FakeKube, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("token-1")
    seed_pods(fake, 1)
    kubeconfig = fake.kubeconfig(token_file=token_file, name="kubeconfig-file")
    async with Informers(fake, kubeconfig=kubeconfig) as informers:
        await informers.synced()
        rereads = metric("outgate_kube_token_rereads_total")
        fake.token = "token-2"  # the kubelet rotated the token...
        token_file.write_text("token-2")  # ...and wrote the new one to the file
        fake.abort_watches("pods")
        fake.create("pods", pod("after-rotation", "10.9.0.5"))
        await eventually(lambda: informers.lookup("10.9.0.5").name == "after-rotation")
        statuses = [r.status for r in fake.requests_for("pods", "watch")]
        assert 401 in statuses
        assert metric("outgate_kube_token_rereads_total") >= rereads + 1


async def test_429_waits_for_retry_after(fake: FakeKube) -> None:
    seed_pods(fake, 1)
    async with Informers(fake) as informers:
        await informers.synced()
        fake.fail("pods", "watch", 429, retry_after=1)
        fake.abort_watches("pods")
        await eventually(lambda: len(fake.requests_for("pods", "watch")) >= 3)
        throttled, retried = fake.requests_for("pods", "watch")[1:3]
        assert throttled.status == 429
        assert retried.at - throttled.at >= 0.95  # never sooner than the server asked
        assert metric("outgate_kube_api_errors_total", resource="pods", status="429") >= 1


@pytest.mark.parametrize("status", [403, 500])
async def test_error_answers_back_off_and_recover(fake: FakeKube, status: int) -> None:
    seed_pods(fake, 1)
    before = metric("outgate_kube_api_errors_total", resource="pods", status=str(status))
    fake.fail("pods", "list", status, times=3)
    async with Informers(fake) as informers:
        await informers.synced()
        lists = fake.requests_for("pods", "list")
        assert [r.status for r in lists] == [status, status, status, 200]
        gaps = [b.at - a.at for a, b in itertools.pairwise(lists)]
        assert all(gap >= 0.02 for gap in gaps)  # 50 ms backoff with jitter: at least 25 ms
        assert (
            metric("outgate_kube_api_errors_total", resource="pods", status=str(status))
            == before + 3
        )


async def test_a_five_mebibyte_pod_by_list_and_by_watch(fake: FakeKube) -> None:
    big = {"blob": "b" * (5 << 20)}
    fake.create("pods", pod("big-listed", "10.9.1.1", annotations=big))
    fake.create("namespaces", namespace("default"))
    async with Informers(fake) as informers:
        await informers.synced()
        assert informers.lookup("10.9.1.1").name == "big-listed"
        fake.create("pods", pod("big-watched", "10.9.1.2", annotations=big))
        await eventually(lambda: informers.lookup("10.9.1.2").name == "big-watched")


async def test_an_event_split_into_many_chunks_inside_a_utf8_character(fake: FakeKube) -> None:
    seed_pods(fake, 1)
    async with Informers(fake) as informers:
        await informers.synced()
        fake.fault_next_event("pods", "split")
        fake.create("pods", pod("split", "10.9.2.1", annotations={"note": "café ✓ 日本"}))
        await eventually(lambda: informers.lookup("10.9.2.1").name == "split")
        assert len(fake.requests_for("pods", "watch")) == 1  # the same watch went on


async def test_an_unknown_event_type_is_skipped_and_the_watch_goes_on(fake: FakeKube) -> None:
    seed_pods(fake, 1)
    async with Informers(fake) as informers:
        await informers.synced()
        unknown = metric("outgate_kube_watch_events_total", resource="pods", type="unknown")
        fake.inject_line("pods", b'{"type":"SURPRISE","object":{"metadata":{}}}\n')
        fake.create("pods", pod("after-unknown", "10.9.3.1"))
        await eventually(lambda: informers.lookup("10.9.3.1").name == "after-unknown")
        assert len(fake.requests_for("pods", "watch")) == 1
        assert (
            metric("outgate_kube_watch_events_total", resource="pods", type="unknown")
            == unknown + 1
        )


async def test_a_malformed_line_ends_the_watch_which_resumes(fake: FakeKube) -> None:
    seed_pods(fake, 1)
    async with Informers(fake) as informers:
        await informers.synced()
        malformed = metric("outgate_kube_watch_events_total", resource="pods", type="malformed")
        fake.inject_line("pods", b'{"type":"ADDED","object":{"metadata":\n')
        fake.create("pods", pod("after-garbage", "10.9.4.1"))
        await eventually(lambda: informers.lookup("10.9.4.1").name == "after-garbage")
        assert len(fake.requests_for("pods", "watch")) == 2
        assert len(fake.requests_for("pods", "list")) == 1
        assert (
            metric("outgate_kube_watch_events_total", resource="pods", type="malformed")
            == malformed + 1
        )


async def test_an_error_event_other_than_410_backs_off_and_rewatches_without_relisting(
    fake: FakeKube,
) -> None:
    seed_pods(fake, 1)
    async with Informers(fake) as informers:
        await informers.synced()
        failed = metric("outgate_kube_watch_restarts_total", resource="pods", reason="api_error")
        error = b'{"type":"ERROR","object":{"kind":"Status","code":500,"reason":"InternalError"}}'
        fake.inject_line("pods", error + b"\n")
        fake.create("pods", pod("after-error", "10.9.5.1"))
        await eventually(lambda: informers.lookup("10.9.5.1").name == "after-error")
        assert len(fake.requests_for("pods", "watch")) == 2
        assert len(fake.requests_for("pods", "list")) == 1
        assert (
            metric("outgate_kube_watch_restarts_total", resource="pods", reason="api_error")
            == failed + 1
        )
