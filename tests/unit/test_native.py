"""Choosing the build (proxy/native.py): compiled only when the build vouches for the sources,
pure Python when forced or when no compiler was there at install time, and said once at start.

Each test works on a copy of the package in a temporary directory, imported by a child process
through PYTHONPATH, so the installed build is never touched.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import proxy as package
from proxy import __version__ as proxy_version
from proxy import native
from tests.support.fixtures import policy_allowing
from tests.support.proxyproc import ProxyProcess
from tests.support.tiers import tier_unavailable

REPORT = (
    "import json, importlib; from proxy import native;"
    " files = [importlib.import_module(m).__file__ for m in native.MODULES];"
    " print(json.dumps({**native.status().fields(), 'files': files}))"
)


def copy_package(into: Path, *, with_build: bool) -> Path:
    """The package under `into`, with or without the compiled files and build record."""
    skipped = ["__pycache__"] if with_build else ["__pycache__", "*.so", "native-build.json"]
    shutil.copytree(native.PACKAGE_DIR, into / "proxy", ignore=shutil.ignore_patterns(*skipped))
    return into


def environment(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CC", native.PURE_ENV)}
    return env | {"PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"} | extra


def child(root: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """`python ARGS` on the copy at `root`, as an install step or a start runs it."""
    return subprocess.run(
        [sys.executable, *args],
        env=environment(root, **extra),
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def report(root: Path, **extra: str) -> dict[str, object]:
    out = child(root, "-c", REPORT, **extra)
    assert out.returncode == 0, out.stderr
    found: dict[str, object] = json.loads(out.stdout)
    return found


def build(root: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return child(root, "-m", "proxy.native_build", "build", **extra)


@pytest.fixture
def compiled_copy(tmp_path: Path) -> Path:
    if not native.status().compiled:
        tier_unavailable("compiled-build", native.status().reason)
    return copy_package(tmp_path, with_build=True)


def test_the_compiled_build_runs_when_it_matches_its_sources(compiled_copy: Path) -> None:
    found = report(compiled_copy)
    assert found["build"] == "compiled" and "reason" not in found
    assert all(not str(f).endswith(".py") for f in found["files"])  # type: ignore[attr-defined]


def test_the_switch_runs_every_listed_module_as_python(compiled_copy: Path) -> None:
    found = report(compiled_copy, OUTGATE_PURE_PYTHON="1")
    assert found["build"] == "pure-python"
    assert found["reason"] == "OUTGATE_PURE_PYTHON=1 is set"
    assert all(str(f).endswith(".py") for f in found["files"])  # type: ignore[attr-defined]


def test_a_source_changed_after_the_build_never_runs_stale_compiled_code(
    compiled_copy: Path,
) -> None:
    source = native.source_path(native.MODULES[0], compiled_copy / "proxy")
    source.write_text(source.read_text() + "\n# edited after the build\n")
    found = report(compiled_copy)
    assert found["build"] == "pure-python"
    assert found["reason"] == f"{source.name} changed since the build; rebuild"
    assert all(str(f).endswith(".py") for f in found["files"])  # type: ignore[attr-defined]


def test_a_package_never_built_runs_as_python(tmp_path: Path) -> None:
    found = report(copy_package(tmp_path, with_build=False))
    assert found["build"] == "pure-python"
    assert "not built" in str(found["reason"])


def test_a_failing_compiler_leaves_python_and_the_install_goes_on(tmp_path: Path) -> None:
    root = copy_package(tmp_path, with_build=False)
    built = build(root, CC="/bin/false")
    assert built.returncode == 0, built.stderr
    reason = "the build failed at install time (the errors are in its output)"
    assert f"outgate: pure Python, {reason}" in built.stderr
    assert not list((root / "proxy").rglob("*.so"))
    assert report(root)["reason"] == reason


def test_an_install_without_a_compiler_runs_python_and_says_so_once_at_start(
    tmp_path: Path,
) -> None:
    """`make run` on a machine without gcc: the build step finds no compiler (PATH holds none),
    records why, and the proxy (with two workers) logs the build once, from the supervisor."""
    root = copy_package(tmp_path / "install", with_build=False)
    no_tools = tmp_path / "empty-bin"
    no_tools.mkdir()
    built = build(root, PATH=str(no_tools))
    assert built.returncode == 0, built.stderr
    assert "outgate: pure Python, no C compiler at install time" in built.stderr
    proxy = ProxyProcess(
        tmp_path / "run",
        policies=policy_allowing("origin.test"),
        config={"workers": 2},
        command=lambda config: [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        env=environment(root, PATH=str(no_tools)),
    )
    with proxy:
        proxy.wait_logs(lambda e: e.get("event") == "listening", count=2, timeout=30)
        _, exported = proxy.admin("/metrics")
    assert 'outgate_build_info{build="pure-python"} 1.0' in exported
    builds = [entry for entry in proxy.logs if entry.get("event") == "build"]
    compiler = str(sysconfig.get_config_var("CC") or "cc").split()[0]
    assert builds == [
        {
            "build": "pure-python",
            "modules": list(native.MODULES),
            "reason": f"no C compiler at install time ({compiler} not found)",
            "event": "build",
            "level": "info",
            "timestamp": builds[0]["timestamp"],
        }
    ]
    assert all(json.loads(line).get("event") != "build" for line in proxy.raw_stdout)
    version = child(root, "-m", "proxy", "--version", PATH=str(no_tools))
    reason = builds[0]["reason"]
    assert version.stdout == f"outgate {proxy_version} (pure Python: {reason})\n", version.stderr


def test_no_python_class_inherits_from_a_compiled_one() -> None:
    """Python cannot make an instance of a Python subclass of a compiled class ("interpreted
    classes cannot inherit from compiled"), and nothing fails before the first instance: a
    subclass of proxy.core.http1.ChunkedDecoder once failed every chunked request, compiled only."""
    if not native.status().compiled:
        tier_unavailable("compiled-build", native.status().reason)
    offenders = []
    for found in pkgutil.walk_packages(package.__path__, "proxy."):
        if found.name.endswith("__main__"):
            continue
        module = importlib.import_module(found.name)
        for value in vars(module).values():
            if not isinstance(value, type) or value.__module__ != module.__name__:
                continue
            if "__mypyc_attrs__" in value.__dict__:
                continue  # compiled itself
            compiled = [b for b in value.__mro__[1:] if "__mypyc_attrs__" in b.__dict__]
            offenders += [f"{value.__qualname__} in {found.name} ({b.__name__})" for b in compiled]
    assert offenders == []
