"""The real-API-server tier: one etcd and kube-apiserver for the whole test run, with the
project's own CRDs, namespace and RBAC applied from manifests/ as an operator applies them.

Each test works in namespaces of its own, so tests share the server without sharing objects.
Without the binaries the tier is skipped with the reason, and fails the run under CI=true
(tests/support/tiers.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import kube as kube_manifests
from tests.support.proxyproc import ProxyProcess
from tests.support.realkube import RealKube, Unavailable, find_binaries
from tests.support.tiers import tier_unavailable

PROXY_NAMESPACE = "outgate-system"
PROXY_ACCOUNT = "outgate"
CRDS = ("clusteregresspolicies.outgate.dev", "egresspolicies.outgate.dev")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.realkube)


def start_cluster(state_dir: Path, *apiserver_args: str) -> RealKube:
    """An API server with the project's manifests applied; skipped (failed under CI) when the
    binaries are not here."""
    try:
        binaries = find_binaries()
    except Unavailable as why:
        tier_unavailable("real-API-server", str(why))
    kube = RealKube(state_dir, binaries=binaries, apiserver_args=apiserver_args).start()
    try:
        # As an operator applies the base: namespaces and CRDs first, then everything else
        # (the Deployment is stored, and stays without pods: there is no controller-manager).
        objects = kube_manifests.render("base")
        first = [o for o in objects if o["kind"] in ("Namespace", "CustomResourceDefinition")]
        for obj in first:
            kube.apply(obj)
        for name in CRDS:
            kube.wait_established(name)
        for obj in objects:
            if obj not in first:
                kube.apply(served_by_1_20(obj))
    except BaseException:
        kube.stop()
        raise
    return kube


def served_by_1_20(obj: dict[str, Any]) -> dict[str, Any]:
    """The object in a version this 1.20 server serves. The one gap in the manifests:
    PodDisruptionBudget's policy/v1 came in 1.21; v1beta1 takes the same fields."""
    if (obj["apiVersion"], obj["kind"]) == ("policy/v1", "PodDisruptionBudget"):
        return {**obj, "apiVersion": "policy/v1beta1"}
    return obj


@pytest.fixture(scope="session")
def realkube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealKube]:
    kube = start_cluster(tmp_path_factory.mktemp("realkube"))
    try:
        yield kube
    finally:
        kube.stop()


@pytest.fixture
def private_kube(tmp_path: Path) -> Iterator[Callable[..., RealKube]]:
    """An API server of the test's own (it may be restarted or compacted), stopped after it."""
    started: list[RealKube] = []

    def start(*apiserver_args: str) -> RealKube:
        kube = start_cluster(tmp_path / f"kube-{len(started)}", *apiserver_args)
        started.append(kube)
        return kube

    yield start
    for kube in started:
        kube.stop()


_names = itertools.count(1)


@pytest.fixture
def namespace_name() -> Callable[[str], str]:
    """Unique names per test, so tests sharing the session's server never meet."""
    run = next(_names)
    return lambda stem: f"{stem}-t{run}"


_addresses = itertools.count(1)


@pytest.fixture
def pod_ip() -> Callable[[], str]:
    """A fresh loopback address for a pod: 127.77.x.y, never handed out twice in a run."""

    def allocate() -> str:
        n = next(_addresses)
        return f"127.77.{n // 250}.{n % 250 + 1}"

    return allocate


def proxy_on(
    kube: RealKube,
    workdir: Path,
    policies: str = "",
    *,
    nameserver: str | None = None,
    account: str = PROXY_ACCOUNT,
    **config: Any,
) -> ProxyProcess:
    """A proxy (not started) as the Deployment runs it against `kube`: identity and policies
    from the API server, authenticated with a token of the ServiceAccount `account` (the
    `outgate` one unless said), bound by the shipped RBAC. `config` entries are merged into
    the settings."""
    workdir.mkdir()
    kubeconfig = kube.service_account_kubeconfig(PROXY_NAMESPACE, account, workdir / "kubeconfig")
    settings: dict[str, Any] = {
        "identity": {"kubernetes": True, "kubeconfig": str(kubeconfig), "static": []},
        "policies": {"paths": ["policies"], "kubernetes": True},
    }
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return ProxyProcess(workdir, policies=policies, nameserver=nameserver, config=settings)


@pytest.fixture
def kube_proxy(realkube: RealKube, tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start proxies on the session's API server (see `proxy_on`)."""
    started: list[ProxyProcess] = []

    def start(
        policies: str = "",
        *,
        name: str = "proxy",
        nameserver: str | None = None,
        account: str = PROXY_ACCOUNT,
        **config: Any,
    ) -> ProxyProcess:
        """`account`: another ServiceAccount of PROXY_NAMESPACE, bound to the same roles, so
        that the audit log tells two proxies apart."""
        proxy = proxy_on(
            realkube, tmp_path / name, policies, nameserver=nameserver, account=account, **config
        )
        started.append(proxy.start())
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
