"""The container image, built and run by a real container engine (the image tier, tests/image/).

The engine is docker when its daemon answers, else podman (`make install-test` installs podman,
buildah, debootstrap and runc where apt-get is available). podman runs with a containers.conf of
the tier's own (CONTAINERS_CONF, CONTAINERS_CONF below). podman builds on Debian's Python 3.11
made from Debian packages (tests/image/build-base.sh, once per machine), so the tier needs no
image registry; docker builds on the Dockerfile's default base, pulled as usual.
OUTGATE_IMAGE_BASE names another base for either.

Fixtures (a pytest plugin, tests/conftest.py), skipped with the reason where no engine can run
(failed under CI=true): `container_engine`, `outgate_image` (built once per run) and
`start_container`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.proxyproc import ProxyProcess
from tests.support.tiers import tier_unavailable
from tests.support.tools import tool

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(
    os.environ.get("OUTGATE_IMAGE_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "outgate-image"
)
LOCAL_BASE = "localhost/bookworm-python:3.11"
CACHE_TAG = "localhost/outgate-test:latest"
BUILD_BASE = REPO / "tests" / "image" / "build-base.sh"
BASE_UNAVAILABLE = 3  # build-base.sh's exit status when this machine cannot make the base
# The image's virtualenv (Dockerfile) and where the tier mounts a proxy's config directory.
VIRTUAL_ENV = "/opt/outgate"
CONFIG_DIR = "/etc/outgate"
NON_ROOT = "65532"  # the Dockerfile's USER, the Deployment's runAsUser
# Needed to build the image, not to run it: pip, the build backend from pyproject.toml's
# build-system.requires, and packaging (the lock installs it only for wheel).
BUILD_ONLY = frozenset({"pip", "setuptools", "wheel", "packaging"})
# Python that prints every distribution an environment holds, as name==version lines.
LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m\n"
    "for d in m.distributions(): print(f\"{d.metadata['Name']}=={d.version}\")"
)
# runc with cgroupfs: crun refuses the hybrid cgroup v1/v2 layout some VMs have. Explicit
# ulimits: the default asks for more open files than such a VM's hard limit, and a process cannot
# raise a limit beyond the hard one.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
"""
RUNC = 'runtime = "runc"\n'
# A build trusts what the host trusts (a host behind a TLS-inspecting proxy): pip in the image's
# fresh virtualenv reads its own bundle unless told otherwise. Mounted for the build only.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PIP_CONF = f"[global]\ncert = {HOST_CA_BUNDLE}\n"
BUILD_TIMEOUT = 900  # a cold build downloads every locked wheel
BASE_TIMEOUT = 900  # debootstrap and two upgrades, on a slow mirror


def normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def distributions(listing: str) -> dict[str, str]:
    """name -> version from LIST_DISTRIBUTIONS' output."""
    return {
        normalise(name): version
        for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", listing, re.M)
    }


def locked_runtime_packages() -> dict[str, str]:
    """requirements.lock's pins less BUILD_ONLY: what the runtime virtualenv should hold."""
    lock = (REPO / "requirements.lock").read_text()
    pins = {normalise(n): v for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.M)}
    assert pins.keys() | {"pip"} >= BUILD_ONLY, "BUILD_ONLY names packages the lock no longer has"
    return {name: version for name, version in pins.items() if name not in BUILD_ONLY}


class Unavailable(Exception):
    """This machine cannot run the tier; the message says why."""


@dataclass(frozen=True)
class Engine:
    name: str  # "docker" or "podman"
    program: str
    env: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.program, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def checked(self, *args: str, timeout: float = 120) -> str:
        done = self(*args, timeout=timeout)
        assert done.returncode == 0, f"{self.name} {' '.join(args)}: {done.stderr[-2000:]}"
        return done.stdout

    # -- the image ------------------------------------------------------------------------
    def base_image(self) -> str | None:
        """The base to build on (None: the Dockerfile's default); made if podman lacks it."""
        if base := os.environ.get("OUTGATE_IMAGE_BASE"):
            return base
        if self.name == "docker":
            return None
        if self("image", "exists", LOCAL_BASE).returncode != 0:
            made = subprocess.run(
                ["sh", str(BUILD_BASE), self.program, LOCAL_BASE],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=BASE_TIMEOUT,
                check=False,
            )
            if made.returncode == BASE_UNAVAILABLE:
                raise Unavailable(f"no base image {LOCAL_BASE}: {made.stderr.strip()}")
            assert made.returncode == 0, f"{BUILD_BASE} failed: {made.stderr[-2000:]}"
        return LOCAL_BASE

    def image_id(self, ref: str) -> str | None:
        found = self("image", "inspect", "--format", "{{.Id}}", ref)
        return found.stdout.strip() if found.returncode == 0 else None

    def build(self, tag: str, *, base: str | None, scratch: Path) -> None:
        """Build the image as `tag`, and as CACHE_TAG. That second tag keeps the latest build's
        layers after the run removes `tag`, so the next run's build reuses all of them; the
        build it replaces is removed once no other run's tag names it."""
        replaced = self.image_id(CACHE_TAG)
        args = ["build", "--network", "host", "-t", tag, "-t", CACHE_TAG]
        if base is not None:
            args += ["--build-arg", f"PYTHON_IMAGE={base}"]
        if self.name == "podman" and HOST_CA_BUNDLE.is_file():  # docker build has no -v
            pip_conf = scratch / "pip.conf"
            pip_conf.write_text(PIP_CONF)
            args += [
                "-v",
                f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
                "-v",
                f"{pip_conf}:/etc/pip.conf:ro",
            ]
        self.checked(*args, str(REPO), timeout=BUILD_TIMEOUT)
        if replaced is not None and replaced != self.image_id(tag) and not self.tags(replaced):
            # Only an image no name points at any more: removing one by its ID removes every
            # tag it has, and another test run on this machine may still be using its own.
            self("rmi", replaced)

    def tags(self, image_id: str) -> list[str]:
        """The names an image still has (both engines: `RepoTags`)."""
        found = self("image", "inspect", "--format", "{{json .RepoTags}}", image_id)
        if found.returncode != 0:
            return []
        return list(json.loads(found.stdout.strip() or "[]") or [])

    # -- containers -----------------------------------------------------------------------
    def hardened(self) -> list[str]:
        """`run` options for a container kept as the Deployment keeps it: host network (origins
        and the API server are on loopback), read-only root, no capabilities, no privilege gain."""
        options = [
            "--network", "host", "--read-only", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
        ]  # fmt: skip
        if self.name == "podman":
            # podman's --read-only adds a writable /tmp unless told not to; Kubernetes'
            # readOnlyRootFilesystem and docker's --read-only do not.
            options.append("--read-only-tmpfs=false")
        return options

    def proxy_command(
        self, image: str, container: str, *options: str
    ) -> Callable[[Path], list[str]]:
        """For ProxyProcess: `outgate run` in a hardened container, its config directory mounted
        read-only at CONFIG_DIR."""

        def command(config: Path) -> list[str]:
            return [
                self.program, "run", "--rm", "--name", container, *self.hardened(),
                "-v", f"{config.parent}:{CONFIG_DIR}:ro", *options,
                image, "run", "--config", f"{CONFIG_DIR}/{config.name}",
            ]  # fmt: skip

        return command


def find_engine() -> Engine:
    """docker if its daemon answers, else podman; Unavailable says what is missing."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "info"], capture_output=True, timeout=30, check=False
        ).returncode
        == 0
    ):
        return Engine("docker", docker, dict(os.environ))
    podman = tool("podman")
    if not os.path.isabs(podman):
        raise Unavailable(
            "no container engine: no docker daemon answers and podman is not installed "
            "(make install-test installs podman where apt-get is available)"
        )
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "containers.conf"
    text = CONTAINERS_CONF + (RUNC if os.path.isabs(tool("runc")) else "")
    if not conf.exists() or conf.read_text() != text:
        part = conf.with_name(f"{conf.name}.{os.getpid()}")
        part.write_text(text)
        part.replace(conf)  # whole, for a test run reading it at the same moment
    return Engine("podman", podman, dict(os.environ) | {"CONTAINERS_CONF": str(conf)})


# -- fixtures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contained:
    """A proxy running in a container of the image: its output, and commands run inside it."""

    proxy: ProxyProcess
    name: str
    engine: Engine

    def exec(self, *argv: str) -> str:
        return self.engine.checked("exec", self.name, *argv)


@pytest.fixture(scope="session")
def container_engine() -> Engine:
    try:
        return find_engine()
    except Unavailable as exc:
        tier_unavailable("image", str(exc))


@pytest.fixture(scope="session")
def outgate_image(
    container_engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The image built from this checkout, tagged for this test run only."""
    engine = container_engine
    try:
        base = engine.base_image()
    except Unavailable as exc:
        tier_unavailable("image", str(exc))
    # One tag per test run: test runs of two checkouts on one machine never share an image.
    tag = f"localhost/outgate-test:{os.getpid()}"
    engine.build(tag, base=base, scratch=tmp_path_factory.mktemp("image-build"))
    yield tag
    engine("rmi", tag)


@pytest.fixture
def start_container(
    container_engine: Engine, outgate_image: str, tmp_path: Path
) -> Iterator[Callable[..., Contained]]:
    """start(policies, *run_options, **ProxyProcess options): a proxy in a hardened container
    (Engine.hardened), ready to serve; stopped with SIGTERM at the end of the test."""
    engine, image = container_engine, outgate_image
    started: list[Contained] = []

    def start(policies: str, *options: str, **kwargs: Any) -> Contained:
        name = f"outgate-test-{os.getpid()}-{len(started)}"
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir(mode=0o755)  # read by the container's user
        command = engine.proxy_command(image, name, *options)
        proxy = ProxyProcess(workdir, policies=policies, command=command, env=engine.env, **kwargs)
        started.append(Contained(proxy, name, engine))
        proxy.start()
        return started[-1]

    yield start
    for contained in started:
        contained.proxy.stop()
        engine("rm", "--force", contained.name)  # only if SIGTERM did not end it
