"""Where Outgate's CPU goes under one bench scenario: a sampling profile of the proxy process,
summed by the module that owns the time (bench/README.md, the issue 16 profiles).

The layout is `make bench`'s: nginx as the origin and the load generator on CPU 1, the proxy
(one worker) on CPU 0, its names from the bench's DNS server. While the load runs, py-spy
samples the proxy (`--native`, so time inside compiled modules and C extensions shows under its
own frame; py-spy pauses the process for each sample, so read shares, not rates) and this
script attributes each sample to the innermost frame in `proxy/` (its own
time and what it calls outside `proxy/`: a write, an asyncio call, a C function), or to the
event loop when no `proxy/` frame is on the stack. Samples of a waiting thread (for the GIL, a
lock, epoll) are left out. Prints a Markdown table of shares and the
hottest leaf functions.

py-spy is a profiling tool, not a dependency of the project: `.venv/bin/pip install py-spy`.

    python -m bench.profile --scenario http|connect_tls [--seconds 20] [--rate 50]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.servers import (
    ORIGIN_NAME,
    NameServer,
    Origin,
    OutgateProxy,
    raise_open_files_limit,
    tool,
)

BENCH_DIR = Path(__file__).resolve().parent
LOADGEN = BENCH_DIR / ".build" / "loadgen"
# A stack with one of these frames is a thread waiting (for the GIL, a lock, a queue, epoll),
# not spending CPU: py-spy --native samples idle threads too.
WAITING = frozenset(
    (
        "epoll_wait",
        "epoll_pwait",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "PyThread_acquire_lock_timed",
        "sem_wait",
        "sem_timedwait",
        "take_gil",
    )
)
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def load_env(origin: Origin) -> dict[str, str]:
    """What bench/wrk_absolute.lua reads: the absolute-form target and its Host."""
    return dict(
        os.environ,
        BENCH_TARGET=f"http://{ORIGIN_NAME}:{origin.http_port}/small",
        BENCH_HOST=f"{ORIGIN_NAME}:{origin.http_port}",
    )


def load_argv(scenario: str, proxy: OutgateProxy, origin: Origin, seconds: float) -> list[str]:
    if scenario == "http":
        return [
            "taskset", "-c", "1", tool("wrk"), "-t1", "-c50", f"-d{seconds:g}s",
            "--timeout", "10s", "-s", str(BENCH_DIR / "wrk_absolute.lua"),
            f"http://127.0.0.1:{proxy.port}",
        ]  # fmt: skip
    return [
        "taskset", "-c", "1", str(LOADGEN), "-mode", "connect-tls",
        "-proxy", f"127.0.0.1:{proxy.port}", "-target", f"{ORIGIN_NAME}:{origin.https_port}",
        "-c", "20", "-warmup", "0s", "-duration", f"{seconds:g}s",
    ]  # fmt: skip


def owner(stack: list[str]) -> str:
    """The innermost `proxy/` module on the stack (frames outermost first), else the loop."""
    for frame in reversed(stack):
        match = FRAME.match(frame)
        path = match["file"] if match else frame
        if "/proxy/" in path:
            path = "proxy/" + path.split("/proxy/", 1)[1]
        if path in ("proxy/cli.py", "proxy/__main__.py"):
            break  # only the loop's run_forever below: the loop's own work
        if path.startswith("proxy/"):
            return path
    return "the event loop itself (uvloop: accept, transports, timers, callbacks), asyncio"


def leaf(stack: list[str]) -> str:
    return stack[-1] if stack else "?"


def summarise(raw: Path, top: int) -> tuple[int, list[str]]:
    by_owner: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stacks, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [f for f in stacks.split(";") if f and not f.startswith(("process ", "thread "))]
        if any(f.split(" (", 1)[0] in WAITING for f in frames):
            continue
        n = int(count)
        total += n
        by_owner[owner(frames)] += n
        by_leaf[leaf(frames)] += n
    rows = ["| Owner (innermost proxy/ module) | share |", "|---|---|"]
    rows += [f"| {name} | {n / total:.1%} |" for name, n in by_owner.most_common(top)]
    rows += ["", "| Hottest leaf frame | share |", "|---|---|"]
    rows += [f"| `{name[:110]}` | {n / total:.1%} |" for name, n in by_leaf.most_common(top)]
    return total, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("http", "connect_tls"), default="http")
    parser.add_argument("--seconds", type=float, default=20.0)
    # py-spy stops the process for each native sample (a millisecond or so): a low rate keeps
    # the load the proxy sees close to the unprofiled one.
    parser.add_argument("--rate", type=int, default=50, help="samples a second")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is missing: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    raise_open_files_limit()
    with tempfile.TemporaryDirectory(prefix="outgate-profile-") as tmp:
        workdir = Path(tmp)
        origin = Origin(workdir, cpu="1")
        nameserver = NameServer()
        proxy = OutgateProxy(workdir, origin, nameserver, cpu="0", python=Path(sys.executable))
        origin.start()
        nameserver.start()
        try:
            proxy.start()
            proxy.ready()
            env = load_env(origin)
            warm = load_argv(args.scenario, proxy, origin, 2.0)
            subprocess.run(warm, capture_output=True, env=env, check=True)
            raw = workdir / "profile.txt"
            spy_argv = [
                spy, "record", "--pid", str(proxy.pid), "--rate", str(args.rate),
                "--duration", f"{args.seconds:g}", "--format", "raw", "--native",
                "--output", str(raw),
            ]  # fmt: skip
            recorder = subprocess.Popen(spy_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            subprocess.run(
                load_argv(args.scenario, proxy, origin, args.seconds + 1),
                capture_output=True,
                env=env,
                check=True,
            )
            spy_out, _ = recorder.communicate(timeout=args.seconds + 60)
            if not raw.exists():
                print(
                    f"py-spy recorded nothing: {spy_out.decode(errors='replace')}", file=sys.stderr
                )
                return 1
        finally:
            proxy.stop()
            nameserver.stop()
            origin.stop()
        total, rows = summarise(raw, args.top)
    print(f"{args.scenario}: {total} busy samples at {args.rate}/s over {args.seconds:g} s")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
