"""The Markdown of a benchmark run: one row per scenario, Outgate beside Squid, the ratio, and
whether each target of issue 6 is met; with `--baseline REV`, Outgate beside outgate@REV too,
and whether its CPU per operation is within 5 % of REV's. Pure: results dict in, text out."""

from __future__ import annotations

from typing import Any

# Issue 6's targets, as ratios to Squid (lower is better) or absolute bounds.
CPU_RATIO_TARGET = 1.0
TUNNEL_MEMORY_RATIO_TARGET = 0.5
POLICY_SCALE_TARGET = 2.0
POLICY_US_TARGET = 10.0
# Against `--baseline REV`: CPU per operation at most this much above REV's on every row.
BASELINE_TOLERANCE = 0.05


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def _pair(ours: float | None, theirs: float | None, fmt: str) -> str:
    if ours is None and theirs is None:
        return "-"
    ratio = _ratio(ours, theirs)
    text = f"{_num(ours, fmt)} / {_num(theirs, fmt)}"
    return f"{text} ({ratio:.2f}x)" if ratio is not None else text


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cost(row: dict[str, Any]) -> tuple[float | None, str]:
    """The scenario's cost figure: CPU per operation, CPU per GB, or memory per idle tunnel."""
    if row.get("kib_per_tunnel") is not None:
        return row["kib_per_tunnel"], "KiB/tunnel"
    if row.get("cpu_s_per_gb") is not None:
        return row["cpu_s_per_gb"], "CPU s/GB"
    return row.get("cpu_per_op_us"), "CPU us/op"


def _run_ratios(entry: dict[str, Any]) -> str:
    """The cost ratio of each repeat (Outgate's run i over Squid's run i): the spread shows how
    much of a difference is the machine's noise."""
    runs = entry.get("runs", {})
    pairs = zip(runs.get("outgate", []), runs.get("squid", []), strict=False)
    ratios = [_ratio(_cost(ours)[0], _cost(theirs)[0]) for ours, theirs in pairs]
    shown = [f"{r:.2f}" for r in ratios if r is not None]
    return ", ".join(shown) if shown else "-"


def scenario_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| Scenario | Throughput | p50 ms | p99 ms | Cost per op | Cost ratio per run "
        "| Peak RSS MiB | Errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in results.get("scenarios", {}).items():
        ours, theirs = entry["outgate"], entry["squid"]
        if ours.get("gb_per_s") is not None:
            throughput = _pair(ours["gb_per_s"], theirs["gb_per_s"], ".2f") + " GB/s"
        else:
            throughput = _pair(ours.get("throughput"), theirs.get("throughput"), ",.0f") + " /s"
        cost_ours, unit = _cost(ours)
        cost_theirs, _ = _cost(theirs)
        cost_fmt = ".3f" if unit == "CPU s/GB" else ".1f"
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{entry['title']} (`{key}`)",
                    throughput,
                    _pair(ours.get("p50_ms"), theirs.get("p50_ms"), ".2f"),
                    _pair(ours.get("p99_ms"), theirs.get("p99_ms"), ".2f"),
                    f"{_pair(cost_ours, cost_theirs, cost_fmt)} {unit}",
                    _run_ratios(entry),
                    _pair(ours["peak_kib"] / 1024, theirs["peak_kib"] / 1024, ".1f"),
                    f"{ours['errors']} / {theirs['errors']}",
                ]
            )
            + " |"
        )
    return lines


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target of issue 6 this run measured."""
    found: list[tuple[str, str, bool | None]] = []
    scenarios = results.get("scenarios", {})

    def ratio(key: str, field: str) -> float | None:
        if key not in scenarios:
            return None
        return _ratio(scenarios[key]["outgate"].get(field), scenarios[key]["squid"].get(field))

    for key, field, label in (
        ("http", "cpu_per_op_us", "CPU per HTTP keep-alive request <= 1.0x Squid"),
        ("connect_tls", "cpu_per_op_us", "CPU per new CONNECT+TLS tunnel <= 1.0x Squid"),
        ("bulk_1", "cpu_s_per_gb", "CPU per GB, 1 tunnel <= 1.0x Squid"),
        ("bulk_4", "cpu_s_per_gb", "CPU per GB, 4 tunnels <= 1.0x Squid"),
    ):
        value = ratio(key, field)
        if value is not None:
            found.append((label, f"{value:.2f}x", value <= CPU_RATIO_TARGET))
    value = ratio("idle_5000", "kib_per_tunnel")
    if value is not None:
        found.append(("Memory per idle tunnel <= 0.5x Squid", f"{value:.2f}x", value <= 0.5))
    for key, entry in scenarios.items():
        if not entry.get("rate"):
            continue
        value = ratio(key, "p99_ms")
        if value is not None:
            found.append((f"p99 <= Squid's ({key})", f"{value:.2f}x", value <= 1.0))
    if "idle_5000" in scenarios:
        idle = scenarios["idle_5000"]["outgate"]
        extra = idle.get("extra", {})
        found.append(
            (
                f"No errors at {extra.get('tunnels', '?')} idle tunnels",
                f"{idle['errors']} errors, {extra.get('answered', '?')} answered",
                idle["errors"] == 0,
            )
        )
    policy = results.get("micro", {}).get("policy_decision", {})
    if "10" in policy and "10000" in policy:
        small, large = policy["10"]["cold_us"], policy["10000"]["cold_us"]
        found.append(
            (
                "Policy decision at 10,000 rules within 2x of 10 rules",
                f"{large / small:.2f}x ({large:.1f} vs {small:.1f} us)",
                large / small <= POLICY_SCALE_TARGET,
            )
        )
        found.append(("Policy decision under 10 us", f"{large:.1f} us", large < POLICY_US_TARGET))
    return found


def _cpu_cost(row: dict[str, Any]) -> tuple[float | None, str]:
    """The scenario's CPU figure: CPU per GB for bulk, per tunnel's whole life (open, handshake,
    idle, one GET) for the idle tunnels, per operation otherwise."""
    if row.get("cpu_s_per_gb") is not None:
        return row["cpu_s_per_gb"], "CPU s/GB"
    if row.get("kib_per_tunnel") is not None:
        return row.get("cpu_per_op_us"), "CPU us/tunnel"
    return row.get("cpu_per_op_us"), "CPU us/op"


def _baseline_run_ratios(entry: dict[str, Any], figure: str) -> str:
    """Outgate's run i over outgate@REV's run i, for `figure` ("cpu" or a Measurement field)."""
    runs = entry.get("runs", {})
    shown = []
    for ours, theirs in zip(runs.get("outgate", []), runs.get("baseline", []), strict=False):
        if figure == "cpu":
            ratio = _ratio(_cpu_cost(ours)[0], _cpu_cost(theirs)[0])
        else:
            ratio = _ratio(ours.get(figure), theirs.get(figure))
        if ratio is not None:
            shown.append(f"{ratio:.2f}")
    return ", ".join(shown) if shown else "-"


def within_tolerance(ratio: float | None) -> str:
    """`yes` within 5 % either way, `yes (lower)` more than 5 % below REV, `no` above."""
    if ratio is None:
        return "-"
    if ratio > 1 + BASELINE_TOLERANCE:
        return "no"
    if ratio < 1 - BASELINE_TOLERANCE:
        return "yes (lower)"
    return "yes"


def baseline_table(results: dict[str, Any]) -> list[str]:
    """Outgate (the working tree) against outgate@REV, per scenario; empty without a baseline."""
    base = results.get("baseline")
    if not base:
        return []
    label = base.get("label", "baseline")
    pct = f"{BASELINE_TOLERANCE * 100:g} %"
    current = results.get("current", {})
    here = f"HEAD {current['commit'][:7]}" if current.get("commit") else "HEAD ?"
    if current.get("proxy_changes"):
        here += f" + {current['proxy_changes']} changed or new files in proxy/"
    lines = [
        f"Outgate (the working tree: {here}) against `{label}` (commit {base['commit'][:7]}, "
        "its proxy/ in a temporary git worktree, same interpreter and config), in the same run. "
        f"Cells: Outgate / {label} (ratio). Within {pct}: Outgate's CPU figure (median of the "
        f"repeats) is at most {pct} above {label}'s; `yes (lower)`: more than {pct} below it.",
        "",
        "| Scenario | Throughput | p99 ms | p99 ratio per run | CPU cost | CPU ratio per run "
        f"| Peak RSS MiB | Errors | Within {pct} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts: list[tuple[str, float | None]] = []
    for key, entry in results.get("scenarios", {}).items():
        ours, theirs = entry["outgate"], entry.get("baseline")
        if theirs is None:
            continue
        if ours.get("gb_per_s") is not None:
            throughput = _pair(ours["gb_per_s"], theirs["gb_per_s"], ".2f") + " GB/s"
        elif ours.get("throughput") is not None or theirs.get("throughput") is not None:
            throughput = _pair(ours.get("throughput"), theirs.get("throughput"), ",.0f") + " /s"
        else:
            throughput = "-"
        cost_ours, unit = _cpu_cost(ours)
        cost_theirs, _ = _cpu_cost(theirs)
        cost_fmt = ".3f" if unit == "CPU s/GB" else ".1f"
        ratio = _ratio(cost_ours, cost_theirs)
        verdicts.append((key, ratio))
        memory = _pair(ours["peak_kib"] / 1024, theirs["peak_kib"] / 1024, ".1f")
        if ours.get("kib_per_tunnel") is not None:
            memory += "; " + _pair(ours["kib_per_tunnel"], theirs.get("kib_per_tunnel"), ".1f")
            memory += " KiB/tunnel"
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{key}`",
                    throughput,
                    _pair(ours.get("p99_ms"), theirs.get("p99_ms"), ".2f"),
                    _baseline_run_ratios(entry, "p99_ms"),
                    f"{_pair(cost_ours, cost_theirs, cost_fmt)} {unit}",
                    _baseline_run_ratios(entry, "cpu"),
                    memory,
                    f"{ours['errors']} / {theirs['errors']}",
                    within_tolerance(ratio),
                ]
            )
            + " |"
        )
    if verdicts:
        measured = [(key, r) for key, r in verdicts if r is not None]
        every = len(measured) == len(verdicts) and all(
            r <= 1 + BASELINE_TOLERANCE for _, r in measured
        )
        worst = max(measured, key=lambda item: item[1]) if measured else None
        summary = f"CPU within {pct} of {label} on every row: {'yes' if every else 'no'}"
        if worst is not None:
            summary += f" (highest ratio: `{worst[0]}` {worst[1]:.2f}x)"
        lines += ["", summary + "."]
    return lines


def micro_figures(micro: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, us per op) of each micro-benchmark figure, in table order."""
    found: list[tuple[str, float]] = []
    for rules, row in micro.get("policy_decision", {}).items():
        found.append((f"Policy decision, {int(rules):,} rules, cold", row["cold_us"]))
        found.append((f"Policy decision, {int(rules):,} rules, memo hit", row["warm_us"]))
    hello = micro.get("clienthello", {})
    if hello.get("status") == "ok":
        found.append((f"ClientHello parse ({hello['bytes']} B)", hello["us"]))
    head = micro.get("request_head", {})
    if head:
        found.append((f"Request head find + parse ({head['bytes']} B)", head["us"]))
    audit = micro.get("audit_render", {})
    if audit:
        found.append(("Audit records rendered (decision + close)", audit["us"]))
    return found


def micro_baseline_table(results: dict[str, Any]) -> list[str]:
    """The micro-benchmarks of the working tree beside those of outgate@REV."""
    micro, theirs = results.get("micro", {}), results.get("micro_baseline")
    if theirs is None or not micro or "error" in micro:
        return []
    label = results.get("baseline", {}).get("label", "baseline")
    if "error" in theirs:
        return ["", f"Micro-benchmarks against {label} failed: {theirs['error'][-300:]}"]
    before = dict(micro_figures(theirs))
    lines = [
        "",
        f"| Micro-benchmark (CPU 0, best of 25 loops) | us per op: Outgate / {label} (ratio) |",
        "|---|---|",
    ]
    for name, value in micro_figures(micro):
        lines.append(f"| {name} | {_pair(value, before.get(name), '.2f')} |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    s = results.get("settings", {})
    out = [
        f"Run {results.get('date', '?')} on {m.get('cpus', '?')} x {m.get('cpu', '?')}, "
        f"{m.get('memory_gib', '?')} GiB, kernel {m.get('kernel', '?')}, Debian "
        f"{m.get('debian', '?')}, Python {m.get('python', '?')}, {m.get('squid', '?')}, "
        f"nginx {m.get('nginx', '?')}. Proxy on CPU {s.get('proxy_cpu')}, load and origin on "
        f"CPU {s.get('load_cpu')}; {s.get('repeats')} runs per proxy (median), "
        f"{s.get('duration_s')} s windows after {s.get('warmup_s')} s warm-up. "
        "Cells: Outgate / Squid (ratio).",
        "",
        *scenario_table(results),
        "",
        "| Target (issue 6) | Measured | Met |",
        "|---|---|---|",
    ]
    for label, measured, met in targets(results):
        out.append(f"| {label} | {measured} | {'yes' if met else 'no'} |")
    compared = baseline_table(results)
    if compared:
        out += ["", *compared]
    micro = results.get("micro", {})
    if micro and "error" not in micro:
        out += ["", "| Micro-benchmark (CPU 0, best of 25 loops) | us per op |", "|---|---|"]
        for rules, row in micro.get("policy_decision", {}).items():
            out.append(
                f"| Policy decision, {int(rules):,} rules: cold / memo hit "
                f"| {row['cold_us']:.2f} / {row['warm_us']:.2f} |"
            )
        hello = micro.get("clienthello", {})
        if hello.get("status") == "ok":
            out.append(f"| ClientHello parse ({hello['bytes']} B) | {hello['us']:.2f} |")
        else:
            out.append(f"| ClientHello parse | {hello.get('status', '-')} |")
        head = micro.get("request_head", {})
        if head:
            out.append(f"| Request head find + parse ({head['bytes']} B) | {head['us']:.2f} |")
        audit = micro.get("audit_render", {})
        if audit:
            out.append(
                f"| Audit records rendered (decision + close, {audit['close_bytes']} B line) "
                f"| {audit['us']:.2f} |"
            )
    elif micro:
        out += ["", f"Micro-benchmarks failed: {micro['error'][-300:]}"]
    probe = results.get("splice_probe", {})
    if probe and "error" not in probe:
        out.append(
            f"| Tunnel relay, {probe['bytes'] >> 20} MiB over loopback: Protocol relay / "
            f"splice(2), CPU s/GB | {probe['protocol_cpu_s_per_gb']:.3f} / "
            f"{probe['splice_cpu_s_per_gb']:.3f} |"
        )
    out += micro_baseline_table(results)
    scaling = results.get("scaling", [])
    if scaling:
        out += [
            "",
            "| `workers` (HTTP keep-alive, proxy on all CPUs) | Throughput | CPU us/op | p99 ms |",
            "|---|---|---|---|",
        ]
        for row in scaling:
            out.append(
                f"| {row['workers']} | {_num(row['throughput'], ',.0f')} /s "
                f"| {_num(row['cpu_per_op_us'], '.1f')} | {_num(row['p99_ms'], '.2f')} |"
            )
    for name, extra in results.get("extras", {}).items():
        if extra.get("markdown_rows"):
            out += ["", f"From `bench/{name}`:", "", *extra["markdown_rows"]]
        elif extra.get("status") != "absent":
            out += ["", f"`bench/{name}`: {extra.get('status')}"]
    out.append("")
    out.append(f"Elapsed: {results.get('elapsed_s', '?')} s.")
    return "\n".join(out) + "\n"
