"""What an idle tunnel holds, by the line that allocated it: a `tracemalloc` diff of a live proxy
before and after it holds N idle TLS tunnels (bench/README.md, "Memory per idle tunnel").

The layout is `make bench`'s: nginx as the origin, the bench's DNS server, the proxy (one worker,
the `proxy run` CLI under uvloop) on CPU 0 and the load generator's `idle` mode on CPU 1. The
proxy runs under this file's `--traced` mode: tracemalloc is started before the proxy is
imported, and SIGUSR2 writes a snapshot. Snapshots are taken after a short warm-up and once the
N tunnels are open and idle; the diff is printed per tunnel, by line and by call stack.

Traced bytes are Python's allocations (uvloop's own allocations show under the Python frame that
called into it); RSS per tunnel, which `bench.run`'s `idle_5000` row reports, also counts
allocator overhead, and is not measured here (tracemalloc's own memory is in it).

    python -m bench.idle_memory [--tunnels 2000] [--lines 30]
"""

from __future__ import annotations

import argparse
import gc
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import FrameType

from bench.run import LOAD_CPU, LOADGEN, PROXY_CPU, REPO
from bench.servers import (
    ORIGIN_NAME,
    NameServer,
    Origin,
    OutgateProxy,
    raise_open_files_limit,
    wait_port,
)

FRAMES = 12  # call-stack depth recorded per allocation
SNAPSHOT_TIMEOUT = 120.0
START_TIMEOUT = 180.0  # tracing slows the proxy's start several times over


def traced(snapshots: Path, argv: list[str]) -> None:
    """The proxy process: tracemalloc from the first import, a snapshot on each SIGUSR2."""
    tracemalloc.start(FRAMES)
    taken = 0

    def snapshot(_signum: int, _frame: FrameType | None) -> None:
        nonlocal taken
        taken += 1
        gc.collect()
        path = snapshots / f"snapshot-{taken}.pickle"
        tracemalloc.take_snapshot().dump(str(path.with_suffix(".partial")))
        path.with_suffix(".partial").rename(path)

    signal.signal(signal.SIGUSR2, snapshot)
    sys.argv = ["proxy", *argv]
    runpy.run_module("proxy", run_name="__main__", alter_sys=True)


def take(pid: int, snapshots: Path, number: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR2)
    path = snapshots / f"snapshot-{number}.pickle"
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the proxy wrote no snapshot {number}")
        time.sleep(0.1)
    return tracemalloc.Snapshot.load(str(path))


def loadgen(proxy: OutgateProxy, origin: Origin, mode: str, *extra: str) -> list[str]:
    return [
        "taskset", "-c", LOAD_CPU, str(LOADGEN), "-mode", mode,
        "-proxy", f"127.0.0.1:{proxy.port}", "-target", f"{ORIGIN_NAME}:{origin.https_port}",
        *extra,
    ]  # fmt: skip


def short(filename: str) -> str:
    for prefix in (str(REPO) + "/", os.path.dirname(os.__file__) + "/"):
        if filename.startswith(prefix):
            return filename[len(prefix) :]
    return filename


def report(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, tunnels: int, lines: int
) -> None:
    by_line = after.compare_to(before, "lineno")
    grown = sum(stat.size_diff for stat in by_line)
    print(f"Traced bytes per idle tunnel: {grown / tunnels:,.0f} ({tunnels:,} tunnels)\n")
    print("| Bytes a tunnel | Objects a tunnel | Allocated at |\n|---|---|---|")
    for stat in by_line[:lines]:
        frame = stat.traceback[0]
        print(
            f"| {stat.size_diff / tunnels:,.1f} | {stat.count_diff / tunnels:.2f} "
            f"| {short(frame.filename)}:{frame.lineno} |"
        )
    print("\nThe largest by call stack (innermost last, proxy/ and asyncio frames):\n")
    for stat in after.compare_to(before, "traceback")[: min(lines, 12)]:
        frames = [
            f"{short(f.filename)}:{f.lineno}"
            for f in stat.traceback
            if "proxy/" in f.filename or "asyncio" in f.filename
        ]
        print(f"- {stat.size_diff / tunnels:,.1f} B: {' > '.join(frames[-5:])}")


def measure(tunnels: int, lines: int) -> int:
    if not LOADGEN.exists():
        print(f"no load generator at {LOADGEN}: run bench/install.sh first", file=sys.stderr)
        return 2
    raise_open_files_limit()
    with tempfile.TemporaryDirectory(prefix="outgate-idle-memory-") as tmp:
        work, snapshots = Path(tmp), Path(tmp) / "snapshots"
        snapshots.mkdir()
        runner = work / "python"
        command = f"{sys.executable} -m bench.idle_memory --traced {snapshots}"
        runner.write_text(f'#!/bin/sh\ncd {REPO}\nexec {command} "$@"\n')
        runner.chmod(0o755)
        origin, names = Origin(work, cpu=LOAD_CPU), NameServer()
        origin.start()
        names.start()
        proxy = OutgateProxy(work, origin, names, cpu=PROXY_CPU, python=runner)
        try:
            proxy.start()
            wait_port(proxy.port, START_TIMEOUT)
            warm = loadgen(
                proxy, origin, "connect-tls", "-c", "5", "-warmup", "0s", "-duration", "1s"
            )
            subprocess.run(warm, capture_output=True, timeout=SNAPSHOT_TIMEOUT, check=False)
            before = take(proxy.pid, snapshots, 1)
            idle = loadgen(
                proxy,
                origin,
                "idle",
                "-c",
                str(tunnels),
                "-open-parallel",
                "100",
                "-timeout",
                "120s",
            )
            gen = subprocess.Popen(idle, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
            assert gen.stdout is not None and gen.stdin is not None
            after = None
            for line in gen.stdout:
                if line.startswith("OPEN"):
                    after = take(proxy.pid, snapshots, 2)
                    gen.stdin.write("go\n")
                    gen.stdin.flush()
                    break
            gen.communicate(timeout=SNAPSHOT_TIMEOUT)
            if after is None:
                print("the load generator opened no tunnels", file=sys.stderr)
                return 1
        finally:
            proxy.stop()
            origin.stop()
            names.stop()
    report(before, after, tunnels, lines)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=2000)
    parser.add_argument("--lines", type=int, default=30)
    parser.add_argument("--traced", type=Path, help=argparse.SUPPRESS)  # the proxy process
    args, rest = parser.parse_known_args()
    if args.traced is not None:
        traced(args.traced, rest[2:] if rest[:2] == ["-m", "proxy"] else rest)
        return 0
    return measure(args.tunnels, args.lines)


if __name__ == "__main__":
    sys.exit(main())
