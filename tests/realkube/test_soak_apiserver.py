"""Soak against a real API server (issue 17, point 2's last fault): mixed traffic from pods'
addresses runs without a pause while the API server the proxy watches is restarted twice and
etcd is compacted.

While that server is down, pods and policies change through a second API server on the same
etcd, as in a control plane of two replicas: the proxy misses those changes, and must catch up
when its server is back. The first outage is caught up by resuming the watches (the server runs
without a watch cache, so a watch from an old version is served from etcd's history); the
second one's changes are compacted away in etcd before the server returns, so only a relist
catches them up, and the relist synthesises the deleted pod's deletion.

What is checked (docs/operations.md, "What we promise and how it is tested"):
- the proxy never exits, and stays ready through both outages;
- every exchange has exactly one `decision` and one `close` record with the same id;
- every revision the records name stands for one policy version, revisions never go back to
  an older version, and decisions (a sample, and every one made between an outage and its
  catch-up) replayed through `outgate explain` against that version give the same verdict;
- while the server is down the proxy decides on what it last knew: a pod deleted meanwhile
  keeps its identity, a pod created meanwhile is an unknown source (`default_deny`); a proxy
  started during the outage is not ready (/readyz 503) and refuses with 503 `not_ready`;
- within RECOVERY_SECONDS of the server's readiness the missed changes are enforced, a policy
  applied then is enforced within RECOVERY_SECONDS, and the new pod's traffic succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.soak_traffic import KINDS, Ports, run_kind
from proxy.cli import build_parser
from tests.realkube.conftest import proxy_on
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.origin import OriginServer
from tests.support.proxyproc import explain, get_from, ready
from tests.support.realkube import PORTS, RealKube
from tests.support.waiting import wait_for

# docs/operations.md states this bound (the measured times are printed: at most 1.5 s so far).
RECOVERY_SECONDS = 5.0
DOWN_SECONDS = 3.0  # each outage lasts at least this; the server then takes 4 to 9 s to be ready
CLIENTS = 8
# The soak's own kinds, from pods' addresses: keep-alive HTTP, short and long tunnels, a name a
# policy allows and denies by turns, a name no policy allows.
MIX = {"keepalive": 3, "tunnel": 3, "bulk_tunnel": 1, "toggle": 3, "denied": 1}
REPLAY_SAMPLE = 200
# A connection accepted just before the relist may be decided just after it on the identity it
# was accepted with (its close is then `source_gone`).
RELIST_SLACK_SECONDS = 0.5
NAMESPACE = "soak"
LABELS = {"app": "client"}


def namespace_policy(name: str, rule: str, action: str, to: list[dict[str, str]]) -> dict[str, Any]:
    """An EgressPolicy of one rule for the pods labelled LABELS."""
    return {
        "apiVersion": "outgate.dev/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "podSelector": {"matchLabels": LABELS},
            "rules": [{"name": rule, "action": action, "to": to, "ports": PORTS}],
        },
    }


def base_policy() -> dict[str, Any]:
    """The pods' steady policy: origin.test, and loopback for the address guard."""
    return namespace_policy(
        "base", "allow-origin", "Allow", [{"fqdn": "origin.test"}, {"cidr": "127.0.0.0/8"}]
    )


def toggle_policy(version: int) -> dict[str, Any]:
    """Version `version` of the changing policy: toggle.test allowed by a rule named after the
    version when it is even (with loopback for the address guard), denied by one when odd."""
    if version % 2 == 0:
        to = [{"fqdn": "toggle.test"}, {"cidr": "127.0.0.0/8"}]
        return namespace_policy("toggle", f"toggle-{version}", "Allow", to)
    return namespace_policy("toggle", f"toggle-{version}", "Deny", [{"fqdn": "toggle.test"}])


@dataclass
class Outcome:
    started: float
    ended: float
    source: str
    kind: str
    result: str


@dataclass
class Traffic:
    """CLIENTS clients in a thread of their own, each picking a source address and a kind of
    exchange at random, until `stop`."""

    ports: Ports
    sources: list[str]
    sent: int = 0  # exchanges the proxy received whole (each owes two records)
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=asyncio.run, args=(self._clients(),))
        self._thread.start()
        return self

    async def _clients(self) -> None:
        await asyncio.gather(*(self._client(random.Random(n)) for n in range(CLIENTS)))

    async def _client(self, rng: random.Random) -> None:
        names = list(MIX)
        weights = [MIX[n] for n in names]
        while not self._stop.is_set():
            source = rng.choice(self.sources)
            name = rng.choices(names, weights)[0]
            started = time.monotonic()
            ports = Ports(self.ports.proxy, self.ports.admin, self.ports.origin, 0, source)
            outcome = await run_kind(KINDS[name][1], ports)
            self.sent += outcome.exchanges
            self.outcomes.append(Outcome(started, time.monotonic(), source, name, outcome.result))

    def progressed(self, by: int) -> Callable[[], bool]:
        """A condition: `by` more exchanges sent than now."""
        target = self.sent + by
        return lambda: self.sent >= target

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
            assert not self._thread.is_alive(), "the traffic did not stop"


@dataclass
class Outage:
    name: str
    down_at: float = 0.0  # time.monotonic()
    ready_at: float = 0.0  # the API server's readiness
    caught_up_at: float = 0.0  # what was missed is enforced
    figures: dict[str, float] = field(default_factory=dict)


@pytest.fixture
def control_plane(
    private_kube: Callable[..., RealKube], tmp_path: Path
) -> Iterator[tuple[RealKube, RealKube]]:
    """The proxy's API server (no watch cache: a watch from an old version reaches etcd, so
    the compaction is what forces a relist), and a second one on the same etcd."""
    kube = private_kube("--watch-cache=false")
    peer = kube.peer(tmp_path / "peer")
    try:
        yield kube, peer
    finally:
        peer.stop()


def test_two_restarts_and_a_compaction_under_traffic_lose_no_record_and_follow_the_revision(
    control_plane: tuple[RealKube, RealKube],
    pod_ip: Callable[[], str],
    origin: OriginServer,
    dns_server: ScriptedDNSServer,
    tmp_path: Path,
) -> None:
    kube, peer = control_plane
    for name in ("origin.test", "toggle.test"):
        dns_server.addresses(name, "127.0.0.1")
    kube.create_namespace(NAMESPACE, {"outgate.dev/test-namespace": NAMESPACE})
    kube.apply(base_policy())
    versions = {0: toggle_policy(0)}
    kube.apply(versions[0])
    client_ip, gone_ip, second_ip, new_ip = pod_ip(), pod_ip(), pod_ip(), pod_ip()
    kube.create_pod(NAMESPACE, "client", client_ip, labels=LABELS)
    kube.create_pod(NAMESPACE, "gone", gone_ip, labels=LABELS)

    proxy = proxy_on(kube, tmp_path / "proxy", nameserver=dns_server.nameserver)
    late = proxy_on(kube, tmp_path / "late", nameserver=dns_server.nameserver)
    traffic: Traffic | None = None
    try:
        proxy.start()
        wait_for(lambda: ready(proxy), what="the proxy synced")
        toggle_url = f"http://toggle.test:{origin.port}/hello"
        ports = Ports(proxy.port, proxy.admin_port, origin.port, 0)
        # `second_ip` and `new_ip` belong to no pod yet: unknown sources until they do.
        sources = [client_ip, client_ip, gone_ip, second_ip, new_ip]
        traffic = Traffic(ports, sources).start()
        wait_for(traffic.progressed(200), 30, what="the warm-up's traffic")

        # The digest of what the proxy enforces, read once each version is in force (nothing
        # newer is applied before the next read): digest -> versions.
        digests: defaultdict[str, set[int]] = defaultdict(set)

        def enforced(version: int) -> Callable[[], float | None]:
            def check() -> float | None:
                rule = explain(proxy, client_ip, toggle_url)["decision"].get("rule")
                if rule != f"toggle-{version}":
                    return None
                at = time.monotonic()
                digests[json.loads(proxy.admin("/readyz")[1])["policy_digest"]].add(version)
                return at

            return check

        def known(ip: str) -> bool:
            return bool(explain(proxy, ip, toggle_url)["workload"]["kind"] == "pod")

        def first_ok_from(ip: str, since: float) -> float | None:
            assert traffic is not None
            found = [
                o.ended
                for o in list(traffic.outcomes)
                if o.source == ip and o.started >= since and o.result == "ok"
                if o.kind in ("keepalive", "tunnel")
            ]
            return min(found, default=None)

        def recovered(outage: Outage, version: int, new_pod_ip: str) -> None:
            """After `outage` caught up: `version` applied through the proxy's own server is
            enforced, and the pod created during the outage is served."""
            versions[version] = toggle_policy(version)
            applied_at = time.monotonic()
            kube.apply(versions[version])
            outage.figures["policy_after_s"] = (
                wait_for(enforced(version), RECOVERY_SECONDS, what=f"version {version} applied")
                - applied_at
            )
            served = wait_for(
                lambda: first_ok_from(new_pod_ip, outage.ready_at),
                RECOVERY_SECONDS,
                what=f"the pod created during {outage.name} served",
            )
            outage.figures.update(
                caught_up_s=outage.caught_up_at - outage.ready_at,
                new_pod_served_s=served - outage.ready_at,
            )

        wait_for(enforced(0), what="version 0 in force")

        # -- outage 1: a policy change and a new pod while the server is down ---------------
        first = Outage("restart 1")
        late_checks: dict[str, Any] = {}

        def during_first() -> None:
            assert traffic is not None
            first.down_at = time.monotonic()
            versions[1] = toggle_policy(1)
            peer.apply(versions[1])
            peer.create_pod(NAMESPACE, "second", second_ip, labels=LABELS)
            # A proxy started now cannot sync: not ready, and it refuses rather than decide.
            late.start()
            wait_for(lambda: late.admin("/readyz")[0] == 503, what="/readyz 503 while unsynced")
            status, headers, _ = get_from(late, client_ip, f"http://origin.test:{origin.port}/")
            late_checks.update(status=status, reason=headers.get("x-outgate-reason"))
            assert ready(proxy), "a synced proxy stays ready while its API server is down"
            wait_for(traffic.progressed(200), 30, what="traffic during the outage")

        first.ready_at = kube.restart_apiserver(down_for=DOWN_SECONDS, while_down=during_first)
        first.caught_up_at = wait_for(
            lambda: known(second_ip) and enforced(1)(),
            RECOVERY_SECONDS,
            what="the changes made during outage 1 enforced",
        )
        late_ready_at = wait_for(
            lambda: ready(late) and time.monotonic(),
            RECOVERY_SECONDS,
            what="the proxy started during the outage ready",
        )
        first.figures["late_proxy_ready_s"] = late_ready_at - first.ready_at
        recovered(first, 2, second_ip)

        # -- outage 2: a deletion, a new pod and a policy change, compacted away ------------
        second = Outage("restart 2 + compaction")
        gone_decisions_at_delete: list[int] = []

        def from_gone(after: float = 0.0) -> int:
            """Decisions on the deleted pod's address, made after `after` (wall clock)."""
            return sum(
                1
                for r in list(proxy.records)
                if r["event"]["action"] == "decision" and r["source"]["ip"] == gone_ip
                if stamp(r["@timestamp"]) > after
            )

        def during_second() -> None:
            assert traffic is not None
            second.down_at = time.monotonic()
            peer.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/gone")
            gone_decisions_at_delete.append(from_gone())
            peer.create_pod(NAMESPACE, "new", new_ip, labels=LABELS)
            versions[3] = toggle_policy(3)
            peer.apply(versions[3])
            second.figures["compacted_at_revision"] = kube.compact()
            assert ready(proxy), "a synced proxy stays ready while its API server is down"
            # The deleted pod's address keeps being decided on (as the pod it last was).
            wait_for(
                lambda: from_gone() >= gone_decisions_at_delete[0] + 20,
                30,
                what="decisions on the deleted pod's address during the outage",
            )
            wait_for(traffic.progressed(200), 30, what="traffic during the outage")

        second.ready_at = kube.restart_apiserver(down_for=DOWN_SECONDS, while_down=during_second)
        relist = proxy.wait_log(
            lambda e: (
                (e.get("event"), e.get("resource"), e.get("reason"))
                == ("kube_listed", "pods", "expired")
                and e.get("synthesised_deletions", 0) >= 1
            ),
            timeout=RECOVERY_SECONDS,
        )
        second.caught_up_at = wait_for(
            lambda: not known(gone_ip) and known(new_ip) and enforced(3)(),
            RECOVERY_SECONDS,
            what="the changes made during outage 2 enforced",
        )
        recovered(second, 4, new_ip)
        relisted_wall = stamp(relist["timestamp"])
        wait_for(
            lambda: from_gone(after=relisted_wall + RELIST_SLACK_SECONDS) >= 10,
            30,
            what="decisions on the deleted pod's address after the relist",
        )
        wait_for(traffic.progressed(200), 30, what="traffic after the faults")
        traffic.stop()
        assert proxy.proc is not None and proxy.proc.poll() is None, "the proxy exited"
        assert late.proc is not None and late.proc.poll() is None, "the late proxy exited"
    finally:
        if traffic is not None:
            traffic.stop()
        late_rc = late.stop()
        proxy_rc = proxy.stop()
    assert (proxy_rc, late_rc) == (0, 0)

    # -- records: one decision and one close per exchange --------------------------------
    pairs = pairing(proxy.records)
    late_pairs = pairing(late.records)
    ids = len(pairs["ids"])
    assert pairs["bad"] == [] and late_pairs["bad"] == [], (pairs["bad"][:5], late_pairs["bad"])
    decisions = [r for r in proxy.records if r["event"]["action"] == "decision"]
    # The exchanges the clients sent, against the ids of their records (a plain-HTTP request
    # inside a tunnel has an id of its own, `tunnel_http`). A client that met an error after
    # sending (a connection closed as `source_gone`) cannot tell whether the proxy had read it.
    sent = sum(1 for r in decisions if r["outgate"]["connection"] != "tunnel_http")
    errors = sum(1 for o in traffic.outcomes if o.result != "ok" and "status_" not in o.result)
    assert traffic.sent - errors <= sent <= traffic.sent, (traffic.sent, errors, sent)

    # -- refusals while unsynced: 503 not_ready --------------------------------------------
    assert late_checks == {"status": 503, "reason": "not_ready"}
    assert [r["outgate"]["reason"] for r in late.records if r["event"]["action"] == "decision"][
        :1
    ] == ["not_ready"]

    # -- identity while the server was down: last known, and unknown for the new -----------
    gone = [r for r in decisions if r["source"]["ip"] == gone_ip]
    during = gone[gone_decisions_at_delete[0] :]
    before_relist = [r for r in during if stamp(r["@timestamp"]) < relisted_wall]
    after_relist = [
        r for r in during if stamp(r["@timestamp"]) > relisted_wall + RELIST_SLACK_SECONDS
    ]
    assert before_relist and {r["outgate"]["source_kind"] for r in before_relist} == {"pod"}
    assert after_relist and {r["outgate"]["source_kind"] for r in after_relist} == {"unknown"}
    unknown_new = [
        r for r in decisions if r["source"]["ip"] == new_ip and r["outgate"]["source_kind"] != "pod"
    ]
    assert unknown_new and {r["outgate"]["reason"] for r in unknown_new} == {"default_deny"}

    # -- every revision stands for one policy version; decisions replayed ------------------
    # The revision each record names -> its digest (the proxy's log) -> the version enforced
    # with that digest; the versions the toggle decisions' rules name must agree.
    assert all(len(v) == 1 for v in digests.values()), digests
    version_by_digest = {digest: next(iter(v)) for digest, v in digests.items()}
    installs = [
        e for e in proxy.logs if e.get("event") in ("kube_policies_installed", "policy_loaded")
    ]
    version_of = {
        e["revision"]: version_by_digest[e["digest"]]
        for e in installs
        if e["digest"] in version_by_digest
    }
    named = Counter(r["outgate"].get("policy_revision") for r in decisions)
    unmapped = {revision: n for revision, n in named.items() if revision not in version_of}
    assert unmapped == {}, f"decisions on a revision of no version: {unmapped}, {installs}"
    by_rule = versions_by_revision(decisions)
    assert all(v == {version_of[r]} for r, v in by_rule.items()), (by_rule, version_of)
    order = [version_of[r] for r in sorted(named)]
    assert order == sorted(order), f"a later revision enforced an older version: {version_of}"
    outages = [first, second]
    in_windows = [r for r in decisions if in_outage(r, outages)]
    rest = [r for r in decisions if not in_outage(r, outages)]
    sample = in_windows + random.Random(17).sample(rest, min(REPLAY_SAMPLE, len(rest)))
    replayer = Replayer(tmp_path / "replay", proxy.config_path, base_policy(), versions)
    mismatches = [
        (r["event"]["id"], got)
        for r in sample
        if (got := replayer.verdict(r, version_of[r["outgate"]["policy_revision"]]))
        != (r["outgate"]["decision"], r["outgate"]["reason"], r.get("rule", {}).get("name"))
    ]
    assert mismatches == [], mismatches[:5]

    # -- recovery within the stated time, and every figure printed -------------------------
    for outage in outages:
        for name in ("caught_up_s", "policy_after_s", "new_pod_served_s"):
            assert outage.figures[name] <= RECOVERY_SECONDS, (outage.name, outage.figures)
    kinds = Counter((o.kind, o.result) for o in traffic.outcomes)
    client_failures = [o for o in traffic.outcomes if o.source == client_ip and o.result != "ok"]
    assert client_failures == [], client_failures[:5]
    print(
        json.dumps(
            {
                "exchanges": traffic.sent,
                "tunnels": sum(n for (k, _), n in kinds.items() if k in ("tunnel", "bulk_tunnel")),
                "exchanges_with_records": sent,
                "client_errors": errors,
                "ids_paired": ids,
                "records": len(proxy.records),
                "decisions_replayed": len(sample),
                "of_them_in_outages": len(in_windows),
                "distinct_explains": replayer.runs,
                "revisions": {str(k): v for k, v in sorted(version_of.items())},
                "decisions_per_revision": {str(k): n for k, n in sorted(named.items())},
                "installs": len(installs),
                "outcomes": {f"{k}:{r}": n for (k, r), n in sorted(kinds.items())},
                "faults": {
                    o.name: {
                        "down_until_ready_s": round(o.ready_at - o.down_at, 2),
                        **{k: round(v, 2) for k, v in o.figures.items()},
                    }
                    for o in outages
                },
                "deleted_pod_decisions_while_down": len(before_relist),
                "new_pod_decisions_while_unknown": len(unknown_new),
                "expired_relists": Counter(
                    e["resource"]
                    for e in proxy.logs
                    if (e.get("event"), e.get("reason")) == ("kube_listed", "expired")
                ),
                "closes_source_gone": sum(
                    1
                    for r in proxy.records
                    if r["event"]["action"] == "close" and r["outgate"]["reason"] == "source_gone"
                ),
            },
            indent=1,
        )
    )


def stamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def pairing(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The ids, and those without exactly one decision and one close."""
    actions: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        actions[record["event"]["id"]][record["event"]["action"]] += 1
    bad = [(i, dict(c)) for i, c in actions.items() if c != Counter(decision=1, close=1)]
    return {"ids": set(actions), "bad": bad}


def versions_by_revision(decisions: list[dict[str, Any]]) -> dict[int, set[int]]:
    """For each policy revision the records name, the toggle versions their rules name."""
    found: defaultdict[int, set[int]] = defaultdict(set)
    for record in decisions:
        rule = record.get("rule", {}).get("name", "")
        if rule.startswith("toggle-"):
            found[record["outgate"]["policy_revision"]].add(int(rule.split("-")[1]))
    return dict(found)


def in_outage(record: dict[str, Any], outages: list[Outage]) -> bool:
    """Decided between an outage's start and its catch-up (wall clock from the monotonic
    marks)."""
    offset = time.time() - time.monotonic()
    at = stamp(record["@timestamp"])
    return any(o.down_at + offset <= at <= o.caught_up_at + offset for o in outages)


class Replayer:
    """`outgate explain` (its command, in this process: a few milliseconds a call) on the
    policies of one version, with the record's source as a static identity when the record
    names a pod, and as an unknown source otherwise."""

    def __init__(
        self,
        workdir: Path,
        config: Path,
        base: dict[str, Any],
        versions: dict[int, dict[str, Any]],
    ) -> None:
        self.workdir = workdir
        self.settings = yaml.safe_load(config.read_text())
        self.base = base
        self.versions = versions
        self.runs = 0
        self._cache: dict[tuple[Any, ...], tuple[str, str, str | None]] = {}

    def verdict(self, record: dict[str, Any], version: int) -> tuple[str, str, str | None]:
        source = record["source"]["ip"]
        destination = record["destination"]
        host, port = destination["domain"] or destination["ip"], destination["port"]
        tunnel = record["outgate"]["connection"] == "tunnel"
        url = f"{host}:{port}" if tunnel else f"http://{host}:{port}/"
        pod = record.get("kubernetes") if record["outgate"]["source_kind"] == "pod" else None
        identity = None
        if pod is not None:
            identity = (pod["namespace"], pod["pod"]["name"], json.dumps(pod["pod"]["labels"]))
        key = (version, source, identity, url)
        if key not in self._cache:
            self._cache[key] = self._explain(version, source, identity, url)
        return self._cache[key]

    def _explain(
        self, version: int, source: str, identity: tuple[str, str, str] | None, url: str
    ) -> tuple[str, str, str | None]:
        self.runs += 1
        policies = self.workdir / f"v{version}"
        if not policies.exists():
            policies.mkdir(parents=True)
            documents = [self.base, self.versions[version]]
            (policies / "policies.yaml").write_text(yaml.safe_dump_all(documents))
        static = []
        if identity is not None:
            namespace, name, labels = identity
            static.append(
                {
                    "name": name,
                    "namespace": namespace,
                    "labels": json.loads(labels),
                    "cidrs": [f"{source}/32"],
                }
            )
        settings = {
            **self.settings,
            "identity": {"static": static},
            "policies": {"paths": [str(policies)]},
        }
        config = self.workdir / f"config-{self.runs}.yaml"
        config.write_text(yaml.safe_dump(settings))
        args = build_parser().parse_args(
            ["explain", "--config", str(config), "--source", source, "--url", url]
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = args.func(args)
        assert code == 0, out.getvalue()
        for line in out.getvalue().splitlines():
            if line.startswith("decision:"):
                # decision:    allow (rule_allow) by soak/base rule allow-origin [...]
                words = line.split()
                rule = words[words.index("rule") + 1] if "rule" in words else None
                return words[1], words[2].strip("()"), rule
        raise AssertionError(f"no decision line in {out.getvalue()!r}")
