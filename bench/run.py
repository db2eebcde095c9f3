"""`make bench`: every scenario against Outgate and Squid in the same run, side by side.

Layout of a run (2 CPUs): the proxy under test is pinned to CPU 0; nginx (the origin), the load
generators and this script run on CPU 1. Each (scenario, proxy) gets a fresh proxy process, so
peak memory belongs to that scenario alone; proxies alternate (Squid, Outgate, then Outgate,
Squid) across repeats and each figure is the median of its repeats, which keeps a noisy
neighbour from landing on one proxy only.

Figures per scenario: throughput, p50/p99 latency, proxy CPU per operation (utime + stime from
/proc over the measured window: it counts what the proxy spent, not what it waited), peak
memory (VmHWM), errors, and each as a ratio to Squid. Writes bench/results/latest.json and
latest.md and prints the table. Everything listens on 127.0.0.1 and is stopped before exit.

`--baseline REV` adds a third contender, `outgate@REV`: the `proxy` package of that git revision,
checked out into a temporary git worktree (removed at the end) and run with the same interpreter
and config as the working tree's Outgate, in every scenario and repeat; the report then gives,
per row, Outgate's CPU per operation and p99 as ratios to it, per repeat too, and whether the
CPU per operation is within 5 %.

  python -m bench.run [--quick] [--repeats N] [--only http,connect_tls,...] [--baseline REV]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat
from bench.report import render_markdown
from bench.servers import (
    ORIGIN_NAME,
    NameServer,
    Origin,
    OutgateProxy,
    Proxy,
    SquidProxy,
    raise_open_files_limit,
    require_imports,
    safe_name,
    tool,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
LOADGEN = BENCH_DIR / ".build" / "loadgen"
RESULTS = BENCH_DIR / "results"
PROXY_CPU = "0"
LOAD_CPU = "1"
# A run that overstays this is killed: load loops are bounded in count and time.
STEP_TIMEOUT = 240.0
# Scripts other issues add (TLS, Kubernetes, overload, splice); run when present, their rows
# included.
EXTRA_SCRIPTS = ("tls_bench.py", "kube_scale.py", "overload.py", "tunnel_splice.py")
EXTRA_TIMEOUT = 300.0
GIT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    mode: str  # "wrk" or a loadgen -mode
    concurrency: int
    path: str = "/small"
    rate: bool = True  # measured in operations per second (p99 target applies)


SCENARIOS = (
    Scenario("http", "HTTP keep-alive GET, 128 B body, 50 connections", "wrk", 50),
    Scenario("connect_tls", "New CONNECT + TLS + one GET, 20 at a time", "connect-tls", 20),
    Scenario("tunnel_gets", "GETs inside 20 kept TLS tunnels", "tunnel-gets", 20),
    Scenario("bulk_1", "1 bulk download through a TLS tunnel", "bulk", 1, "/bulk", rate=False),
    Scenario("bulk_4", "4 bulk downloads through TLS tunnels", "bulk", 4, "/bulk", rate=False),
    Scenario("idle_5000", "5,000 idle TLS tunnels, then a GET on each", "idle", 5000, rate=False),
)


@dataclass
class Measurement:
    scenario: str
    proxy: str
    ops: int = 0
    seconds: float = 0.0
    throughput: float | None = None  # operations per second
    gb_per_s: float | None = None  # bulk
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_seconds: float = 0.0
    cpu_per_op_us: float | None = None
    cpu_s_per_gb: float | None = None
    peak_kib: int = 0
    kib_per_tunnel: float | None = None
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {out.stderr.strip()[-500:]}")
    return out.stdout.strip()


@dataclass
class BaselineTree:
    """`outgate@REV`: REV's tree checked out into a temporary, detached git worktree. Only the
    worktree list of the repository changes (no branch, no index, no checkout); `remove` undoes
    that."""

    rev: str
    commit: str
    path: Path

    @property
    def label(self) -> str:
        return f"outgate@{self.rev}"

    @classmethod
    def add(cls, rev: str) -> BaselineTree:
        try:
            commit = _git("rev-parse", "--verify", "--quiet", "--end-of-options", rev + "^{commit}")
        except RuntimeError:
            raise RuntimeError(f"{rev!r} is not a commit of {REPO}") from None
        path = Path(tempfile.mkdtemp(prefix=f"outgate-baseline-{safe_name(rev)}-"))
        tree = cls(rev=rev, commit=commit, path=path)
        try:
            _git("worktree", "add", "--detach", "--quiet", str(path), commit)
            if not (path / "proxy" / "__main__.py").exists():
                raise RuntimeError(f"{rev} ({commit[:12]}) has no proxy/__main__.py")
            # Compile once here, so no proxy process of the run pays for it.
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", str(path / "proxy")],
                capture_output=True,
                timeout=GIT_TIMEOUT,
                check=False,
            )
        except BaseException:
            tree.remove()
            raise
        return tree

    def remove(self) -> None:
        try:
            _git("worktree", "remove", "--force", str(self.path))
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            print(f"bench: git worktree remove {self.path}: {error}", file=sys.stderr)
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _git("worktree", "prune")


def current_tree() -> dict[str, Any]:
    """What the working tree's Outgate is: HEAD's commit, and whether proxy/ differs from it."""
    found: dict[str, Any] = {}
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, OSError):
        found["commit"] = _git("rev-parse", "HEAD")
        found["proxy_changes"] = len(
            _git("status", "--porcelain", "--untracked-files=all", "--", "proxy").splitlines()
        )
    return found


class Bench:
    def __init__(
        self, args: argparse.Namespace, workdir: Path, baseline: BaselineTree | None = None
    ) -> None:
        self.args = args
        self.workdir = workdir
        self.warmup = 1.0 if args.quick else 2.0
        self.duration = 3.0 if args.quick else float(args.duration)
        self.idle_tunnels = 500 if args.quick else 5000
        self.nameserver = NameServer()
        self.origin = Origin(workdir, cpu=LOAD_CPU)
        self.python = Path(sys.executable)
        self.baseline = baseline

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.nameserver.start()
        self.origin.start()

    def stop(self) -> None:
        self.origin.stop()
        self.nameserver.stop()

    @contextlib.contextmanager
    def proxy(self, name: str, *, workers: int = 1, cpu: str = PROXY_CPU) -> Iterator[Proxy]:
        run_dir = Path(tempfile.mkdtemp(prefix=f"{safe_name(name)}-", dir=self.workdir))
        run_dir.chmod(0o777)
        proxy: Proxy
        if name == "squid":
            proxy = SquidProxy(run_dir, self.origin, cpu=cpu)
        elif self.baseline is not None and name == self.baseline.label:
            proxy = OutgateProxy(
                run_dir,
                self.origin,
                self.nameserver,
                cpu=cpu,
                workers=workers,
                python=self.python,
                name=name,
                source=self.baseline.path,
            )
        else:
            proxy = OutgateProxy(
                run_dir, self.origin, self.nameserver, cpu=cpu, workers=workers, python=self.python
            )
        proxy.start()
        try:
            proxy.ready()
            yield proxy
        finally:
            proxy.stop()

    # -- scenarios --------------------------------------------------------------------------
    def measure(self, scenario: Scenario, name: str) -> Measurement:
        with self.proxy(name) as proxy:
            try:
                if scenario.mode == "wrk":
                    result = self._wrk(proxy, scenario)
                elif scenario.mode == "idle":
                    result = self._idle(proxy, scenario)
                else:
                    result = self._loadgen(proxy, scenario)
            except RuntimeError as error:
                state = "running" if proxy.alive() else "exited"
                raise RuntimeError(
                    f"{error}\n{proxy.label} ({state}), last lines of its stderr:\n"
                    f"{proxy.stderr_tail()}"
                ) from error
            result.peak_kib = procstat.sample(proxy.pid).peak_kib
            if not proxy.alive():
                result.errors += 1
                result.extra["died"] = proxy.stderr_tail()
            return result

    def _wrk(self, proxy: Proxy, scenario: Scenario, *, cpu: str = LOAD_CPU) -> Measurement:
        env = dict(
            os.environ,
            BENCH_TARGET=f"http://{ORIGIN_NAME}:{self.origin.http_port}{scenario.path}",
            BENCH_HOST=f"{ORIGIN_NAME}:{self.origin.http_port}",
        )

        def wrk(seconds: float) -> dict[str, Any]:
            argv = [
                "taskset", "-c", cpu, tool("wrk"), "-t1", f"-c{scenario.concurrency}",
                f"-d{seconds:g}s", "--timeout", "10s", "-s", str(BENCH_DIR / "wrk_absolute.lua"),
                f"http://127.0.0.1:{proxy.port}",
            ]  # fmt: skip
            out = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if not lines:
                raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")
            parsed: dict[str, Any] = json.loads(lines[-1])
            return parsed

        wrk(self.warmup)
        before = procstat.sample(proxy.pid)
        raw = wrk(self.duration)
        after = procstat.sample(proxy.pid)
        seconds = raw["duration_us"] / 1e6
        ops = int(raw["requests"])
        cpu_used = after.cpu_seconds - before.cpu_seconds
        return Measurement(
            scenario=scenario.key,
            proxy=proxy.label,
            ops=ops,
            seconds=seconds,
            throughput=ops / seconds if seconds else None,
            p50_ms=raw["p50_us"] / 1000,
            p99_ms=raw["p99_us"] / 1000,
            cpu_seconds=cpu_used,
            cpu_per_op_us=cpu_used / ops * 1e6 if ops else None,
            errors=int(raw["errors"]) + int(raw["non2xx"]),
        )

    def _loadgen_argv(self, proxy: Proxy, scenario: Scenario, **extra: str) -> list[str]:
        argv = [
            "taskset", "-c", LOAD_CPU, str(LOADGEN), "-mode", scenario.mode,
            "-proxy", f"127.0.0.1:{proxy.port}",
            "-target", f"{ORIGIN_NAME}:{self.origin.https_port}",
            "-path", scenario.path, "-c", str(scenario.concurrency),
            "-warmup", f"{self.warmup:g}s", "-duration", f"{self.duration:g}s",
        ]  # fmt: skip
        for flag, value in extra.items():
            argv += [f"-{flag.replace('_', '-')}", value]
        return argv

    def _loadgen(self, proxy: Proxy, scenario: Scenario) -> Measurement:
        proc = subprocess.Popen(
            self._loadgen_argv(proxy, scenario),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        before = after = None
        raw: dict[str, Any] = {}
        deadline = time.monotonic() + STEP_TIMEOUT
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.strip()
                if line == "MEASURE":
                    before = procstat.sample(proxy.pid)
                elif line == "END":
                    after = procstat.sample(proxy.pid)
                elif line.startswith("{"):
                    raw = json.loads(line)
                if time.monotonic() > deadline:
                    break
        finally:
            _finish(proc)
        if before is None or after is None or not raw:
            raise RuntimeError(f"load generator for {scenario.key} gave no result")
        cpu_used = after.cpu_seconds - before.cpu_seconds
        result = Measurement(
            scenario=scenario.key,
            proxy=proxy.label,
            ops=int(raw["ops"]),
            seconds=float(raw["seconds"]),
            p50_ms=raw.get("p50_ms"),
            p99_ms=raw.get("p99_ms"),
            cpu_seconds=cpu_used,
            errors=int(raw["errors"]),
        )
        if raw.get("first_error"):
            result.extra["first_error"] = raw["first_error"]
        if scenario.mode == "bulk":
            gigabytes = raw["bytes"] / 1e9
            result.gb_per_s = gigabytes / result.seconds if result.seconds else None
            result.cpu_s_per_gb = cpu_used / gigabytes if gigabytes else None
            result.p50_ms = result.p99_ms = None
        else:
            result.throughput = result.ops / result.seconds if result.seconds else None
            result.cpu_per_op_us = cpu_used / result.ops * 1e6 if result.ops else None
        return result

    def _idle(self, proxy: Proxy, scenario: Scenario) -> Measurement:
        # Warm the proxy's tunnel path first, so first-use allocations are not charged to tunnels.
        warm = Scenario("warm", "", "connect-tls", 5)
        subprocess.run(
            self._loadgen_argv(proxy, warm, warmup="0s", duration="1s"),
            capture_output=True,
            timeout=STEP_TIMEOUT,
            check=False,
        )
        time.sleep(0.5)
        base = procstat.sample(proxy.pid)
        wanted = self.idle_tunnels
        proc = subprocess.Popen(
            self._loadgen_argv(
                proxy,
                Scenario(scenario.key, scenario.title, "idle", wanted),
                open_parallel="100",
                timeout="120s",
            ),
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdin is not None
        opened = 0
        held = done = base
        raw: dict[str, Any] = {}
        try:
            for line in proc.stdout:
                line = line.strip()
                if line.startswith("OPEN"):
                    opened = int(line.split()[1])
                    time.sleep(1.0)  # let the last handshakes settle into idle state
                    held = procstat.sample(proxy.pid)
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                elif line.startswith("{"):
                    raw = json.loads(line)
                    done = procstat.sample(proxy.pid)
        finally:
            _finish(proc)
        if not raw:
            raise RuntimeError("the idle-tunnel load generator gave no result")
        # From before the first tunnel opens to the last answer: CPU per tunnel's whole life.
        cpu_used = done.cpu_seconds - base.cpu_seconds
        answered = int(raw.get("answered", 0))
        result = Measurement(
            scenario=scenario.key,
            proxy=proxy.label,
            ops=answered,
            seconds=float(raw["seconds"]),
            p50_ms=raw.get("p50_ms"),
            p99_ms=raw.get("p99_ms"),
            errors=int(raw["errors"]) + (wanted - answered),
            kib_per_tunnel=(held.rss_kib - base.rss_kib) / opened if opened else None,
            cpu_seconds=cpu_used,
            cpu_per_op_us=cpu_used / answered * 1e6 if answered else None,
        )
        result.extra.update(
            tunnels=wanted,
            opened=opened,
            answered=answered,
            rss_before_kib=base.rss_kib,
            rss_idle_kib=held.rss_kib,
        )
        if raw.get("first_error"):
            result.extra["first_error"] = raw["first_error"]
        return result

    # -- scaling (workers: N) ---------------------------------------------------------------
    def scaling(self) -> list[dict[str, Any]]:
        """HTTP keep-alive with `workers: 1` and `workers: 2`, the proxy allowed on every CPU."""
        cpus = f"0-{(os.cpu_count() or 1) - 1}"
        scenario = Scenario("http", "", "wrk", 50)
        rows = []
        for workers in (1, 2):
            with self.proxy("outgate", workers=workers, cpu=cpus) as proxy:
                time.sleep(1.0 if workers > 1 else 0.0)  # every worker up
                measured = self._wrk(proxy, scenario, cpu=cpus)
                rows.append(
                    {
                        "workers": workers,
                        "throughput": measured.throughput,
                        "cpu_per_op_us": measured.cpu_per_op_us,
                        "p99_ms": measured.p99_ms,
                        "errors": measured.errors,
                    }
                )
        return rows


def _finish(proc: subprocess.Popen[str]) -> None:
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def median_of(measurements: list[Measurement]) -> Measurement:
    """Field-wise median of repeats (numbers); the rest from the first."""
    first = measurements[0]
    merged = Measurement(scenario=first.scenario, proxy=first.proxy, extra=dict(first.extra))
    for name, value in asdict(first).items():
        if name in ("scenario", "proxy", "extra"):
            continue
        values = [getattr(m, name) for m in measurements if getattr(m, name) is not None]
        if not values:
            continue
        middle = statistics.median(values)
        if name in ("errors",):
            middle = max(values)  # an error in any repeat counts
        setattr(merged, name, type(value)(middle) if isinstance(value, int) else middle)
    merged.extra["repeats"] = len(measurements)
    return merged


def pinned_module(
    module: str, cpus: str = PROXY_CPU, *, source: Path | None = None
) -> dict[str, Any]:
    """Run `python -m module` pinned to `cpus`; its last stdout line is a JSON object. With
    `source`, bench/<module>.py of this tree runs against the `proxy` package of `source` (run
    by path from that directory, so `source` comes first on sys.path)."""
    argv = ["taskset", "-c", cpus, sys.executable, "-m", module]
    if source is not None:
        script = REPO / (module.replace(".", "/") + ".py")
        runner = (
            "import runpy, sys, proxy\n"
            f"if not proxy.__file__.startswith({str(source) + os.sep!r}):\n"
            "    sys.exit(f'imports {proxy.__file__}')\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
        )
        argv = ["taskset", "-c", cpus, sys.executable, "-c", runner]
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=source if source is not None else REPO,
        env=dict(os.environ, PYTHONPATH=str(source)) if source is not None else None,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    parsed: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return parsed


def extra_scripts() -> dict[str, Any]:
    """Run the EXTRA_SCRIPTS that exist (TLS, Kubernetes, overload); keep JSON and rows."""
    found: dict[str, Any] = {}
    for name in EXTRA_SCRIPTS:
        script = BENCH_DIR / name
        if not script.exists():
            found[name] = {"status": "absent"}
            continue
        try:
            out = subprocess.run(
                [sys.executable, str(script)],
                capture_output=True,
                text=True,
                cwd=REPO,
                timeout=EXTRA_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            found[name] = {"status": f"timed out after {EXTRA_TIMEOUT:g}s"}
            continue
        rows = [line for line in out.stdout.splitlines() if line.lstrip().startswith("|")]
        data: list[Any] = []
        with contextlib.suppress(ValueError):
            data.append(json.loads(out.stdout))
        if not data:
            for line in out.stdout.splitlines():
                if line.lstrip().startswith(("{", "[")):
                    with contextlib.suppress(ValueError):
                        data.append(json.loads(line))
        found[name] = {
            "status": "ok" if out.returncode == 0 else f"exit {out.returncode}",
            "json": data,
            "markdown_rows": rows,
            "stderr_tail": out.stderr[-1000:] if out.returncode else "",
        }
    return found


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    debian = ""
    with contextlib.suppress(OSError):
        debian = Path("/etc/debian_version").read_text().strip()
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "debian": debian,
        "python": platform.python_version(),
        "squid": SquidProxy.version(),
        "nginx": nginx.stderr.strip().replace("nginx version: ", ""),
        "load": Path("/proc/loadavg").read_text().split()[:3],
    }


def check_imports(bench: Bench, baseline: BaselineTree, results: dict[str, Any]) -> None:
    """Both Outgates, started as OutgateProxy starts them, import the tree they should: print
    `proxy.__file__` of each once, and stop the run if any proxy module comes from elsewhere."""
    probe_dir = Path(tempfile.mkdtemp(prefix="import-probe-", dir=bench.workdir))
    for key, label, source in (
        ("current", "outgate", None),
        ("baseline", baseline.label, baseline.path),
    ):
        results[key]["imports"] = require_imports(
            bench.python, source, probe_dir, label=label, prefix="bench"
        )


def run_all(
    args: argparse.Namespace, scenarios: list[Scenario], baseline: BaselineTree | None
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="outgate-bench-"))
    workdir.chmod(0o777)
    bench = Bench(args, workdir, baseline)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": {
            "repeats": args.repeats,
            "warmup_s": bench.warmup,
            "duration_s": bench.duration,
            "idle_tunnels": bench.idle_tunnels,
            "proxy_cpu": PROXY_CPU,
            "load_cpu": LOAD_CPU,
        },
        "scenarios": {},
    }
    # Squid, Outgate (, outgate@REV); odd repeats run them in reverse order, so each proxy runs
    # before and after the others (and Outgate's neighbour alternates between Squid and REV).
    names = ["squid", "outgate"]
    if baseline is not None:
        names.append(baseline.label)
        results["current"] = current_tree()
        results["baseline"] = {
            "rev": baseline.rev,
            "commit": baseline.commit,
            "label": baseline.label,
        }
    try:
        bench.start()
        if baseline is not None:
            check_imports(bench, baseline, results)
        for scenario in scenarios:
            runs: dict[str, list[Measurement]] = {name: [] for name in names}
            for repeat in range(args.repeats if scenario.mode != "idle" else 1):
                order = names if repeat % 2 == 0 else names[::-1]
                for name in order:
                    print(f"bench: {scenario.key} / {name} (run {repeat + 1})", flush=True)
                    runs[name].append(bench.measure(scenario, name))
            entry: dict[str, Any] = {
                "title": scenario.title,
                "rate": scenario.rate,
                "outgate": asdict(median_of(runs["outgate"])),
                "squid": asdict(median_of(runs["squid"])),
                "runs": {name: [asdict(m) for m in runs[name]] for name in ("squid", "outgate")},
            }
            if baseline is not None:
                entry["baseline"] = asdict(median_of(runs[baseline.label]))
                entry["runs"]["baseline"] = [asdict(m) for m in runs[baseline.label]]
            results["scenarios"][scenario.key] = entry
        if not args.no_extras:
            print("bench: micro-benchmarks", flush=True)
            results["micro"] = pinned_module("bench.micro")
            if baseline is not None:
                print(f"bench: micro-benchmarks, {baseline.label}", flush=True)
                results["micro_baseline"] = pinned_module("bench.micro", source=baseline.path)
            print("bench: splice(2) probe", flush=True)
            results["splice_probe"] = pinned_module("bench.splice_probe", f"{PROXY_CPU},{LOAD_CPU}")
            print("bench: workers scaling", flush=True)
            results["scaling"] = bench.scaling()
            print("bench: other issues' scripts", flush=True)
            results["extras"] = extra_scripts()
    finally:
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows, 500 idle tunnels")
    parser.add_argument("--repeats", type=int, default=3, help="runs per proxy and scenario")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--only", default="", help="comma-separated scenario keys")
    parser.add_argument("--no-extras", action="store_true", help="skip micro, scaling, scripts")
    parser.add_argument("--out", default=str(RESULTS), help="directory for latest.json/.md")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default="",
        help="also run the proxy package of git revision REV (outgate@REV) in every scenario",
    )
    args = parser.parse_args(argv)

    if not LOADGEN.exists():
        print("bench: bench/.build/loadgen is missing: run bench/install.sh", file=sys.stderr)
        return 2
    for name in ("squid", "nginx", "wrk", "taskset"):
        tool(name)
    raise_open_files_limit()
    os.sched_setaffinity(0, {int(LOAD_CPU)})  # this script shares the load generator's CPU
    started = time.monotonic()
    wanted = {key for key in args.only.split(",") if key}
    scenarios = [s for s in SCENARIOS if not wanted or s.key in wanted]

    baseline: BaselineTree | None = None
    if args.baseline:
        try:
            baseline = BaselineTree.add(args.baseline)
        except RuntimeError as error:
            print(f"bench: --baseline {args.baseline}: {error}", file=sys.stderr)
            return 2
    try:
        results = run_all(args, scenarios, baseline)
    finally:
        if baseline is not None:
            baseline.remove()
    results["elapsed_s"] = round(time.monotonic() - started, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = render_markdown(results)
    (out / "latest.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
