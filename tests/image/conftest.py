"""The image tier's fixtures: a container engine, the image built once per run, and proxies
started in hardened containers of it (tests/support/image.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.image import Engine, Unavailable, find_engine
from tests.support.proxyproc import ProxyProcess
from tests.support.tiers import tier_unavailable


@dataclass(frozen=True)
class Contained:
    """A proxy running in a container of the image: its output, and commands run inside it."""

    proxy: ProxyProcess
    name: str
    engine: Engine

    def exec(self, *argv: str) -> str:
        return self.engine.checked("exec", self.name, *argv)


@pytest.fixture(scope="session")
def engine() -> Engine:
    try:
        return find_engine()
    except Unavailable as exc:
        tier_unavailable("image", str(exc))


@pytest.fixture(scope="session")
def image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
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
    engine: Engine, image: str, tmp_path: Path
) -> Iterator[Callable[..., Contained]]:
    """start(policies, *run_options, **ProxyProcess options): a proxy in a hardened container
    (Engine.hardened), ready to serve; stopped with SIGTERM at the end of the test."""
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
