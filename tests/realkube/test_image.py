"""The proxy from the image against the real API server, as the Deployment runs it: the
ServiceAccount's token and the cluster CA mounted read-only where a kubelet mounts them, the API
server's address in KUBERNETES_SERVICE_HOST/PORT, the project's RBAC, a read-only root, user
65532 and no capabilities (tests/support/image.py). The API server and the pods' addresses are on
loopback, which the container shares (host network)."""

from __future__ import annotations

import shutil
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.control.kube.config import SERVICE_ACCOUNT_DIR
from tests.realkube.conftest import PROXY_ACCOUNT, PROXY_NAMESPACE
from tests.support.image import Contained
from tests.support.origin import OriginServer
from tests.support.proxyproc import get_from, ready
from tests.support.realkube import RealKube, api_errors_in, cluster_policy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.image


def mounted_service_account(realkube: RealKube, directory: Path) -> Path:
    """What a kubelet mounts for automountServiceAccountToken: a bound token and the CA."""
    directory.mkdir(mode=0o755)
    token = realkube.service_account_token(PROXY_NAMESPACE, PROXY_ACCOUNT)
    (directory / "token").write_text(token)
    shutil.copyfile(realkube.ca_file, directory / "ca.crt")
    for path in directory.iterdir():
        path.chmod(0o644)  # readable by the container's user, as fsGroup makes them
    return directory


def test_the_proxy_from_the_image_runs_on_its_service_account_and_attributes_pods(
    realkube: RealKube,
    start_container: Callable[..., Contained],
    namespace_name: Callable[[str], str],
    pod_ip: Callable[[], str],
    origin: OriginServer,
    tmp_path: Path,
) -> None:
    shop = namespace_name("shop")
    realkube.create_namespace(shop, {"outgate.dev/test-namespace": shop})
    realkube.apply(cluster_policy(namespace_name("shop-egress"), shop))
    ip = pod_ip()
    labels = {"app": "web", "pod-template-hash": "6d8f7"}
    created = realkube.create_pod(
        shop, "web-6d8f7-xkq2p", ip, labels=labels, owner=("ReplicaSet", "web-6d8f7")
    )
    account = mounted_service_account(realkube, tmp_path / "serviceaccount")
    server = urllib.parse.urlsplit(realkube.url)
    running = start_container(
        "",
        *("-v", f"{account}:{SERVICE_ACCOUNT_DIR}:ro"),
        *("-e", f"KUBERNETES_SERVICE_HOST={server.hostname}"),
        *("-e", f"KUBERNETES_SERVICE_PORT={server.port}"),
        config={
            "identity": {"kubernetes": True, "static": []},
            "policies": {"paths": ["policies"], "kubernetes": True},
        },
    )
    proxy = running.proxy
    wait_for(lambda: ready(proxy), what="the containerised proxy synced with the API server")
    assert api_errors_in(proxy) == []

    status, _, _ = get_from(proxy, ip, f"http://127.0.0.1:{origin.port}/hello")
    assert status == 200
    decision, close = proxy.records_by_path("/hello")
    assert decision["source"]["ip"] == ip
    assert decision["kubernetes"]["namespace"] == shop
    assert decision["kubernetes"]["pod"]["name"] == "web-6d8f7-xkq2p"
    assert decision["kubernetes"]["pod"]["uid"] == created["metadata"]["uid"]
    assert decision["outgate"]["workload"] == "Deployment/web"
    assert decision["outgate"]["decision"] == "allow"
    assert close["http"]["response"]["status_code"] == 200
