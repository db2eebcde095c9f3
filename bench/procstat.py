"""CPU time and memory of a process tree, read from /proc (the steady figure on a noisy machine).

CPU is utime + stime of every process in the tree (all threads: the audit writer thread counts),
so it is what the proxy cost whatever else ran. Memory is VmRSS now and VmHWM (peak) summed over
the tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    pids = [pid]
    index = 0
    while index < len(pids):
        pids.extend(_children(pids[index]))
        index += 1
    return pids


def _cpu_seconds(pid: int) -> float:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    # Fields 14 and 15 of stat(5) (utime, stime), counted from the state field (3).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True, slots=True)
class Sample:
    cpu_seconds: float
    rss_kib: int
    peak_kib: int


def sample(pid: int) -> Sample:
    pids = tree(pid)
    return Sample(
        cpu_seconds=sum(_cpu_seconds(p) for p in pids),
        rss_kib=sum(_status_kib(p, "VmRSS:") for p in pids),
        peak_kib=sum(_status_kib(p, "VmHWM:") for p in pids),
    )


def open_descriptors(pid: int) -> int:
    """Open file descriptors of the whole tree (/proc/PID/fd of each process)."""
    total = 0
    for p in tree(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return total


def per_process(pid: int) -> dict[int, tuple[int, int]]:
    """pid -> (VmRSS KiB, open descriptors) for every process of the tree alive now."""
    found = {}
    for p in tree(pid):
        try:
            fds = len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
        found[p] = (_status_kib(p, "VmRSS:"), fds)
    return found
