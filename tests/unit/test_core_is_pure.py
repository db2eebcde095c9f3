"""STYLE habit 1: proxy/core imports no asyncio, socket, ssl or aiohttp, directly or not."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "proxy" / "core"
FORBIDDEN = ("asyncio", "socket", "ssl", "aiohttp", "uvloop")
MODULES = sorted(
    ".".join(path.relative_to(CORE.parents[1]).with_suffix("").parts).removesuffix(".__init__")
    for path in CORE.rglob("*.py")
)


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_core_module_has_no_io_imports_in_its_source(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & set(FORBIDDEN), f"{path} imports {imported & set(FORBIDDEN)}"


def test_importing_the_whole_core_loads_no_io_module() -> None:
    """Also catches an I/O import pulled in through a non-core module the core uses."""
    code = (
        "import sys\n"
        f"for name in {MODULES!r}:\n"
        "    __import__(name)\n"
        f"bad = sorted(m for m in {FORBIDDEN!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "", f"core pulls in: {result.stdout.strip()}"
