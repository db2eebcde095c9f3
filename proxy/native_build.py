"""`python -m proxy.native_build build`: compile proxy.native.MODULES with mypyc, in place.

The Makefile's install steps and the Dockerfile's build stage run it. Each module's extension
file lands next to its `.py`, where Python's import prefers it, and the group's shared library
(`proxy/_compiled__mypyc.<abi>.so`) beside them; the build record (proxy/native-build.json) holds
a SHA-256 of each source compiled, which `proxy.native.choose()` checks at import. The step never
fails an install: without a C compiler, Python's headers or mypyc, or when the build fails, it
leaves pure Python and records why (with `--require` it exits 1 instead: the image must ship the
compiled build). `clean` removes the compiled files and the record.

Never compiled itself; mypyc and setuptools are imported only to build.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

from proxy.native import (
    BUILD_RECORD,
    GROUP,
    MODULES,
    PACKAGE_DIR,
    Status,
    source_digest,
    source_path,
)


def compiler_missing() -> str:
    """Why no C extension can be built here ("" when one can)."""
    compiler = os.environ.get("CC") or str(sysconfig.get_config_var("CC") or "cc")
    program = compiler.split()[0] if compiler.split() else "cc"
    if shutil.which(program) is None:
        return f"no C compiler at install time ({program} not found)"
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        return f"no Python headers at install time ({include}/Python.h not found)"
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc (from mypy) not installed at install time"
    return ""


def compiled_files(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    stems = [source_path(m, package_dir).with_suffix("") for m in MODULES]
    stems.append(package_dir / (GROUP.split(".")[-1] + "__mypyc"))
    return [p for s in stems for p in s.parent.glob(s.name + ".*") if p.name.endswith(suffixes)]


def clean(package_dir: Path = PACKAGE_DIR) -> None:
    for path in compiled_files(package_dir):
        path.unlink()
    (package_dir / BUILD_RECORD.name).unlink(missing_ok=True)


def _compile(package_dir: Path, work: Path) -> None:
    """mypyc over MODULES in a scratch copy of the package, then the results copied in place.

    Building in a copy keeps mypy from reading whatever else sits beside the package (in a
    virtualenv, site-packages: its modules would shadow the installed libraries) and leaves
    nothing in the package but the compiled files."""
    from mypyc.build import mypycify
    from setuptools import Distribution  # type: ignore[import-untyped, unused-ignore]

    root = work / "src"
    ignored = shutil.ignore_patterns("__pycache__", "*.so", BUILD_RECORD.name)
    shutil.copytree(package_dir, root / package_dir.name, ignore=ignored)
    paths = [f"--cache-dir={work / 'mypy'}"] + [str(source_path(m, Path("proxy"))) for m in MODULES]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        extensions = mypycify(paths, opt_level="3", target_dir=str(work / "c"), group_name=GROUP)
        dist = Distribution({"ext_modules": extensions, "script_name": "setup.py"})
        dist.script_args = ["-q", "build_ext", "--inplace"]
        dist.script_args += ["--build-temp", str(work / "tmp"), "--build-lib", str(work / "lib")]
        dist.parse_command_line()
        dist.run_commands()
    finally:
        os.chdir(cwd)
    built = root / package_dir.name
    for path in compiled_files(built):
        shutil.copy2(path, package_dir / path.relative_to(built))


def build(package_dir: Path = PACKAGE_DIR, *, require: bool = False) -> Status:
    """Compile MODULES in place and write the build record; pure Python (and why) if it cannot."""
    clean(package_dir)
    record = package_dir / BUILD_RECORD.name
    reason = compiler_missing()
    if not reason:
        sources = {m: source_digest(source_path(m, package_dir)) for m in MODULES}
        with tempfile.TemporaryDirectory(prefix="outgate-mypyc-") as work:
            try:
                _compile(package_dir, Path(work))
            except (Exception, SystemExit):  # mypy's errors and the compiler's exit setuptools
                clean(package_dir)
                reason = "the build failed at install time (the errors are in its output)"
        if not reason:
            record.write_text(json.dumps({"compiled": True, "sources": sources}, indent=1) + "\n")
            return Status(compiled=True, reason="")
    record.write_text(json.dumps({"compiled": False, "reason": reason}, indent=1) + "\n")
    if require:
        raise SystemExit(f"proxy.native_build: {reason}")
    return Status(compiled=False, reason=reason)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["build"]:
        result = build(require="--require" in args)
        if result.compiled:
            print(f"outgate: compiled {', '.join(MODULES)} with mypyc", file=sys.stderr)
        else:
            print(f"outgate: pure Python, {result.reason}", file=sys.stderr)
        return 0
    if args[:1] == ["clean"]:
        clean()
        return 0
    print("usage: python -m proxy.native_build build [--require] | clean", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
