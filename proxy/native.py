"""The compiled build: which modules mypyc compiles, and choosing the build at import.

`MODULES` is the one list of compiled modules; the build step (proxy/native_build.py, run by
the Makefile's install steps and the Dockerfile's build stage), the import-time check and the
tests read it from here. The build compiles them with mypyc in place, next to their `.py`, and
writes `BUILD_RECORD`: a SHA-256 of each source compiled, or why it could not compile.

At import (`proxy/__init__.py` calls `choose()`), the compiled modules are used only if the
build record says they were built from exactly the sources beside them (a SHA-256 of each `.py`):
a source edited after the build runs as Python, never as stale compiled code. They are also
skipped when `OUTGATE_PURE_PYTHON=1` is set, the switch tests use to run the pure build. Either
way it is all or none: a meta-path finder loads every listed module from its `.py`.

`status()` says which build runs and why; `outgate run` logs it once at start-up (`build`, on
stderr), `outgate --version` prints it, `outgate_build_info` exports it. docs/performance.md has
the design and how it is tested; bench/README.md the figures.

This module is never compiled and imports only the standard library.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

# The modules mypyc compiles, in one group. Each one is kept only if bench.micro shows it helps
# (bench/README.md, "Issue 16: compiled build").
MODULES: tuple[str, ...] = (
    "proxy.core.http1",
    "proxy.core.clienthello",
)
GROUP = "proxy._compiled"  # the shared library: proxy/_compiled__mypyc.<abi>.so
PURE_ENV = "OUTGATE_PURE_PYTHON"
PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_RECORD = PACKAGE_DIR / "native-build.json"


@dataclass(frozen=True, slots=True)
class Status:
    compiled: bool
    reason: str  # why pure Python runs; "" when compiled

    def fields(self) -> dict[str, object]:
        """The start-up log line's fields."""
        build = "compiled" if self.compiled else "pure-python"
        out: dict[str, object] = {"build": build, "modules": list(MODULES)}
        if self.reason:
            out["reason"] = self.reason
        return out


def source_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    """proxy.core.http1 -> <package_dir>/core/http1.py"""
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- choosing the build at import ----------------------------------------------------------------


class _PureSource(importlib.abc.MetaPathFinder):
    """Loads the listed modules from their `.py`, ahead of the extension files beside them."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


_chosen: Status | None = None


def _recorded_reason(package_dir: Path) -> str:
    """Why the build record does not vouch for the sources beside it ("" when it does)."""
    try:
        record = json.loads((package_dir / BUILD_RECORD.name).read_text())
    except FileNotFoundError:
        return "not built (the install step `python -m proxy.native_build build` did not run)"
    except (OSError, ValueError) as exc:
        return f"unreadable build record {BUILD_RECORD.name}: {exc}"
    if not record.get("compiled"):
        return str(record.get("reason", "not built"))
    sources = record.get("sources", {})
    if sorted(sources) != sorted(MODULES):
        return "the build compiled another module list; rebuild (make install)"
    for module in MODULES:
        try:
            digest = source_digest(source_path(module, package_dir))
        except OSError:
            return f"{module}'s source is missing"
        if digest != sources[module]:
            return f"{source_path(module, package_dir).name} changed since the build; rebuild"
    return ""


def choose() -> Status:
    """Decide once, before any listed module is imported; later calls return the choice."""
    global _chosen
    if _chosen is not None:
        return _chosen
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        reason = f"{PURE_ENV}={os.environ[PURE_ENV]} is set"
    else:
        reason = _recorded_reason(PACKAGE_DIR)
    if reason:
        sys.meta_path.insert(0, _PureSource())
    _chosen = Status(compiled=not reason, reason=reason)
    return _chosen


def is_compiled(module: ModuleType) -> bool:
    """Loaded from an extension file (not from `.py` or `.pyc`)."""
    return (module.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def status() -> Status:
    """The build that runs: the choice, checked against the modules actually loaded."""
    chosen = choose()
    if not chosen.compiled:
        return chosen
    for name in MODULES:
        module = importlib.import_module(name)
        if not is_compiled(module):
            return Status(compiled=False, reason=f"no compiled file for {name} on this Python")
    return chosen


if __name__ == "__main__":
    # `python proxy/native.py`: the listed modules' sources, for the Makefile's rebuild rule.
    print(" ".join(str(source_path(m).relative_to(Path.cwd())) for m in MODULES))
