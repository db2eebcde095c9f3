"""The container image: the Dockerfile's properties, and its build steps run for real.

tests/image/ builds and runs the image with a container engine, where one can run. These tests
need none, so they run everywhere and fast: `test_the_image_build_steps_work` interprets the
Dockerfile's stages in a temporary directory standing in for the image's root filesystem:
WORKDIR, ENV and COPY act on paths under it, and every RUN line runs as written (with `sh -c`,
as the image builder does). The one difference: pip reads the wheels `make install-test`
downloaded from the same hash-checked lock (.venv/wheelhouse) instead of the index, since these
tests use no network.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.kube import REPO
from tests.support.image import LIST_DISTRIBUTIONS, distributions, locked_runtime_packages

DOCKERFILE = REPO / "Dockerfile"
WHEELHOUSE = REPO / ".venv" / "wheelhouse"
CONFIG_IN_IMAGE = "/etc/outgate/config.yaml"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    found: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())
STAGES = stages(INSTRUCTIONS)
RUNTIME = STAGES[-1]


def _only(stage: list[Instruction], keyword: str) -> str:
    found = [i.arguments for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def _env_pairs(arguments: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in shlex.split(arguments))


# --- properties -------------------------------------------------------------------------------


def test_the_build_is_multi_stage_on_a_slim_python_base() -> None:
    assert len(STAGES) >= 2
    args = {
        name: value
        for i in INSTRUCTIONS
        if i.keyword == "ARG" and "=" in i.arguments
        for name, value in [i.arguments.split("=", 1)]
    }
    bases = [stage[0].arguments.split()[0] for stage in STAGES]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base) for base in bases]
    assert all(re.fullmatch(r"python:3\.11[.\d]*-slim(-\w+)?(@sha256:\w+)?", b) for b in resolved)
    assert any(" AS " in stage[0].arguments.upper() for stage in STAGES[:-1])
    assert any(i.keyword == "COPY" and i.arguments.startswith("--from=") for i in RUNTIME)


def test_dependencies_come_from_the_hash_checked_lock() -> None:
    runs = [i.arguments for stage in STAGES[:-1] for i in stage if i.keyword == "RUN"]
    installs = [r for r in runs if "pip" in r and " install " in r]
    assert any("--require-hashes" in r and "-r requirements.lock" in r for r in installs)
    assert all("--no-deps" in r for r in installs), "every install is pinned by the lock alone"
    lock = (REPO / "requirements.lock").read_text()
    requirements = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, flags=re.MULTILINE)
    assert requirements, "requirements.lock pins versions"
    for name, _ in requirements:
        assert re.search(rf"^{re.escape(name)}==\S+ .*\\\n\s+--hash=sha256:", lock, re.M), name


def test_the_build_needs_no_frontend_image() -> None:
    # A `# syntax=` parser directive makes BuildKit pull a frontend image from a registry.
    directives = re.findall(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), flags=re.M | re.I)
    assert directives == []


def test_it_runs_as_a_numeric_non_root_user() -> None:
    user = _only(RUNTIME, "USER")
    assert re.fullmatch(r"\d+(:\d+)?", user), "numeric, so runAsNonRoot can verify it"
    assert all(int(part) != 0 for part in user.split(":"))


def test_it_exposes_the_proxy_and_admin_ports() -> None:
    exposed = {p for i in RUNTIME if i.keyword == "EXPOSE" for p in i.arguments.split()}
    assert {"3128", "9090"} <= exposed


def test_entrypoint_and_cmd() -> None:
    assert json.loads(_only(RUNTIME, "ENTRYPOINT")) == ["outgate"]
    assert json.loads(_only(RUNTIME, "CMD")) == ["run", "--config", CONFIG_IN_IMAGE]


def test_it_writes_nothing_at_run_time() -> None:
    # A read-only root filesystem: no bytecode written next to the sources at import.
    env: dict[str, str] = {}
    for i in RUNTIME:
        if i.keyword == "ENV":
            env |= _env_pairs(i.arguments)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"


def _dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for a file path: the last matching pattern wins; "!" re-includes;
    a pattern matching a directory covers everything under it."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            allowed = negate
    return allowed


def test_the_dockerignore_keeps_the_context_to_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        source
        for stage in STAGES
        for i in stage
        if i.keyword == "COPY" and not i.arguments.startswith("--from=")
        for source in shlex.split(i.arguments)[:-1]
    ]
    copied = [
        str(path.relative_to(REPO))
        for source in sources
        for path in (sorted(REPO.glob(source)) or [REPO / source])
        for path in (
            [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        )
        if "__pycache__" not in path.parts
    ]
    assert copied and all(_dockerignore_allows(p, patterns) for p in copied), copied
    for kept_out in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "manifests/base/x"):
        assert not _dockerignore_allows(kept_out, patterns), kept_out


# --- the build, run -----------------------------------------------------------------------------


class EmulatedBuild:
    """Runs Dockerfile stages with `root` standing in for the image's filesystem."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.base_env = env
        self.args: dict[str, str] = {}

    def container_path(self, path: str, cwd: Path) -> Path:
        return self.root / path.lstrip("/") if path.startswith("/") else cwd / path

    def run_stage(self, stage: list[Instruction]) -> dict[str, str]:
        env = dict(self.base_env)
        cwd = self.root
        for instruction in stage[1:]:
            keyword, arguments = instruction.keyword, instruction.arguments
            if keyword == "ENV":
                for name, value in _env_pairs(arguments).items():
                    if name != "PATH":  # the test calls the virtualenv's programs by path
                        env[name] = (
                            str(self.root / value.lstrip("/")) if value.startswith("/") else value
                        )
            elif keyword == "WORKDIR":
                cwd = self.container_path(arguments, cwd)
                cwd.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                self.copy(shlex.split(arguments), cwd)
            elif keyword == "RUN":
                subprocess.run(["sh", "-c", arguments], cwd=cwd, env=env, check=True)
        return env

    def copy(self, words: list[str], cwd: Path) -> None:
        if words[0].startswith("--from="):
            # Stages share one root here, so copying between them is copying a path onto itself.
            assert words[1] == words[2], "only same-path copies between stages are emulated"
            assert self.container_path(words[1], cwd).exists()
            return
        *sources, destination = words
        target = self.container_path(destination, cwd)
        for source in sources:
            for path in sorted(REPO.glob(source)):
                if path.is_dir():
                    shutil.copytree(path, target, dirs_exist_ok=True)
                else:
                    into = target / path.name if destination.endswith("/") else target
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, into)


def _snapshot(root: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    if not any(WHEELHOUSE.glob("*.whl")):
        pytest.fail(
            f"{WHEELHOUSE} is empty: run `make install-test` (it downloads the lock's wheels)"
        )
    root = tmp_path_factory.mktemp("image-root")
    tools = tmp_path_factory.mktemp("tools")
    # The base image's `python`: this interpreter, whose venv module makes a clean virtualenv.
    (tools / "python").symlink_to(sys.executable)
    env = {
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(root),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(WHEELHOUSE),
    }
    build = EmulatedBuild(root, env)
    runtime_env: dict[str, str] = {}
    for stage in STAGES:
        runtime_env = build.run_stage(stage)
    runtime_env = {
        key: value for key, value in runtime_env.items() if not key.startswith("PIP_")
    } | {"PATH": os.environ["PATH"]}
    return root, runtime_env


def _outgate(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    program = root / "opt" / "outgate" / "bin" / "outgate"
    return subprocess.run(
        [str(program), *args], env=env, capture_output=True, text=True, check=False
    )


def test_the_image_build_steps_work(built_image: tuple[Path, dict[str, str]]) -> None:
    root, env = built_image
    version = _outgate(root, env, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("outgate ")
    assert version.stdout.rstrip().endswith("(compiled)"), "the image ships the compiled build"
    before = _snapshot(root)
    config = str(root / CONFIG_IN_IMAGE.lstrip("/"))
    checked = _outgate(root, env, "check-config", config)
    assert checked.returncode == 0, checked.stderr
    assert "config valid" in checked.stdout
    explained = _outgate(
        root,
        env,
        "explain",
        "--config",
        config,
        "--source",
        "10.1.2.3",
        "--url",
        "https://pastebin.com/",
    )
    assert explained.returncode == 0, explained.stderr
    assert _snapshot(root) == before, "running the image wrote files (read-only root filesystem)"


def test_the_image_holds_exactly_the_locked_runtime_packages(
    built_image: tuple[Path, dict[str, str]],
) -> None:
    """The lock's packages less the build tools: pip, the build backend and what only it needs
    are removed before the runtime stage copies the virtualenv."""
    root, env = built_image
    python = root / "opt" / "outgate" / "bin" / "python"
    listed = subprocess.run(
        [str(python), "-c", LIST_DISTRIBUTIONS], env=env, capture_output=True, text=True, check=True
    )
    installed = distributions(listed.stdout)
    assert installed.pop("outgate")
    assert installed == locked_runtime_packages()
    assert not (root / "opt" / "outgate" / "bin" / "pip").exists()


def test_the_lock_covers_every_runtime_dependency() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    lock = (REPO / "requirements.lock").read_text()
    locked = {n.lower() for n in re.findall(r"^([A-Za-z0-9_.-]+)==", lock, flags=re.M)}
    missing = sorted(n for n in wanted if n.replace("_", "-") not in locked)
    assert missing == [], "regenerate requirements.lock (the command is in its header)"
