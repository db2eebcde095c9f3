"""The image, built by a real container engine and run as the Deployment runs it: read-only root,
user 65532, no capabilities, no privilege gain (tests/support/image.py).

The proxy in the container uses the host's network, so it reaches the origin and the DNS server
the tests start on 127.0.0.1, and the tests reach its ports; its stdout is the audit log."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.support.clients import curl
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.image import (
    CONFIG_DIR,
    LIST_DISTRIBUTIONS,
    NON_ROOT,
    REPO,
    VIRTUAL_ENV,
    Contained,
    Engine,
    distributions,
    locked_runtime_packages,
)
from tests.support.origin import OriginServer

pytestmark = pytest.mark.image

StartContainer = Callable[..., Contained]
PYTHON = f"{VIRTUAL_ENV}/bin/python"
# The build tools' packages, metadata, scripts and .pth hooks left in the virtualenv, if any.
FIND_BUILD_TOOLS = f"""
import glob, os, re
tool = re.compile(r"(pip|setuptools|wheel|packaging|pkg_resources|_distutils_hack|distutils-)")
places = glob.glob("{VIRTUAL_ENV}/lib/python3*/site-packages") + ["{VIRTUAL_ENV}/bin"]
for place in places:
    for name in os.listdir(place):
        if tool.match(name):
            print(os.path.join(place, name))
"""
# Where writing fails, as the proxy's user: the root filesystem is read-only, /tmp included.
TRY_WRITES = """
import errno
for path in ("/tmp/probe", "/etc/outgate/probe", "/opt/outgate/probe"):
    try:
        open(path, "w")
        print(path, "written")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
"""


def status_fields(text: str) -> dict[str, str]:
    """/proc/PID/status as name -> value."""
    return {
        name: value.strip() for name, _, value in (ln.partition(":") for ln in text.splitlines())
    }


def pre_stop_hook() -> list[str]:
    deployment = yaml.safe_load((REPO / "manifests" / "base" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command: list[str] = container["lifecycle"]["preStop"]["exec"]["command"]
    return command


@pytest.fixture
def served(
    start_container: StartContainer, dns_server: ScriptedDNSServer
) -> Callable[..., Contained]:
    """A container proxy whose policy allows origin.test (127.0.0.1 by the test DNS server)."""
    dns_server.addresses("origin.test", "127.0.0.1")

    def start(*options: str, **kwargs: object) -> Contained:
        return start_container(
            policy_allowing("origin.test"), *options, nameserver=dns_server.nameserver, **kwargs
        )

    return start


def test_the_runtime_virtualenv_holds_the_locked_packages_and_no_build_tools(
    container_engine: Engine, outgate_image: str
) -> None:
    engine = container_engine

    def python(code: str) -> str:
        return engine.checked(
            "run", "--rm", *engine.hardened(), "--entrypoint", PYTHON, outgate_image, "-c", code
        )

    installed = distributions(python(LIST_DISTRIBUTIONS))
    assert installed.pop("outgate") == "0.1.0"
    assert installed == locked_runtime_packages()
    assert python(FIND_BUILD_TOOLS) == ""


def test_it_runs_read_only_as_the_non_root_user_without_capabilities(
    served: Callable[..., Contained],
) -> None:
    running = served()
    status = status_fields(running.exec(PYTHON, "-c", "print(open('/proc/1/status').read())"))
    assert status["Uid"].split() == [NON_ROOT] * 4
    assert status["Gid"].split() == [NON_ROOT] * 4
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capabilities], 16) == 0, (capabilities, status[capabilities])
    assert status["NoNewPrivs"] == "1"
    command = running.exec(PYTHON, "-c", "print(open('/proc/1/cmdline').read().split('\\0'))")
    assert "run" in command and f"{CONFIG_DIR}/outgate.yaml" in command  # pid 1 is the proxy
    assert running.exec(PYTHON, "-c", TRY_WRITES).splitlines() == [
        "/tmp/probe EROFS",
        "/etc/outgate/probe EROFS",
        "/opt/outgate/probe EROFS",
    ]


def test_an_allowed_and_a_denied_request_are_audited_on_the_container_stdout(
    served: Callable[..., Contained], origin: OriginServer
) -> None:
    proxy = served().proxy
    # The image ships the compiled build (Dockerfile, proxy/native.py), and says so at start.
    build = proxy.wait_log(lambda e: e.get("event") == "build")
    assert build["build"] == "compiled" and "reason" not in build, build
    allowed = curl("-x", proxy.url, "-i", f"http://origin.test:{origin.port}/hello")
    assert allowed.stdout.startswith("HTTP/1.1 200"), allowed.stdout + allowed.stderr
    assert allowed.stdout.endswith("hello from origin\n")
    decision, close = proxy.records_by_path("/hello")
    assert decision["outgate"]["decision"] == "allow"
    assert decision["rule"] == {"name": "allow-origins", "ruleset": "tests/tests"}
    assert decision["kubernetes"]["pod"]["name"] == "test-client"
    assert close["http"]["response"]["status_code"] == 200
    assert close["outgate"]["reason"] == "completed"

    denied = curl("-x", proxy.url, "-i", "http://forbidden.test/secret")
    assert denied.stdout.startswith("HTTP/1.1 403"), denied.stdout + denied.stderr
    assert "X-Outgate-Reason: namespace_isolation" in denied.stdout
    decision, close = proxy.records_by_path("/secret")
    assert decision["outgate"]["decision"] == "deny"
    assert decision["outgate"]["reason"] == "namespace_isolation"
    assert close["http"]["response"]["status_code"] == 403


def test_the_deployments_pre_stop_hook_runs_in_the_image_then_sigterm_stops_it_cleanly(
    served: Callable[..., Contained], origin: OriginServer
) -> None:
    running = served()
    hook = pre_stop_hook()
    started = time.monotonic()
    finished = subprocess.run(
        [running.engine.program, "exec", running.name, *hook],
        env=running.engine.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    assert time.monotonic() - started >= float(hook[-1]), "the hook returned before its sleep"
    assert curl("-x", running.proxy.url, f"http://origin.test:{origin.port}/hello").returncode == 0
    assert running.proxy.stop() == 0


def test_workers_above_1_without_a_writable_tmp_stop_with_a_one_line_error(
    container_engine: Engine, outgate_image: str, tmp_path: Path
) -> None:
    config = tmp_path / "config"
    config.mkdir(mode=0o755)
    settings = {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "workers": 2}
    (config / "outgate.yaml").write_text(yaml.safe_dump(settings))
    done = container_engine(
        "run", "--rm", *container_engine.hardened(), "-v", f"{config}:{CONFIG_DIR}:ro",
        outgate_image, "run", "--config", f"{CONFIG_DIR}/outgate.yaml",
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"error: {CONFIG_DIR}/outgate.yaml: workers: 2 worker processes share their metrics "
        "through a temporary directory, and /tmp is not writable (Read-only file system) -- "
        "fix: mount an emptyDir or a tmpfs at /tmp (docker run --tmpfs /tmp), or workers: 1"
    ]


def test_workers_above_1_serve_with_a_tmpfs_at_tmp(
    served: Callable[..., Contained], origin: OriginServer
) -> None:
    proxy = served("--tmpfs", "/tmp", config={"workers": 2}).proxy
    assert proxy.admin("/readyz")[0] == 200
    result = curl("-x", proxy.url, f"http://origin.test:{origin.port}/hello")
    assert result.stdout == "hello from origin\n", result.stderr
    assert proxy.records_by_path("/hello")[0]["outgate"]["decision"] == "allow"
