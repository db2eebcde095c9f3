"""Instructions per call of bench.micro's ClientHello, request-head and audit-record operations.

Wall-clock micro-benchmarks move with the load of this shared machine; an instruction count does
not. Each operation runs under `valgrind --tool=cachegrind --cache-sim=no` twice, once with 0
and once with N calls after the same warm-up (50 calls), and (I(N) - I(0)) / N is one call's
instructions, garbage collection included (the loop runs with it on, as the proxy does). The
inputs are bench.micro's: the 517-byte hello from Python's ssl, the 190-byte head, the decision
and close records of one request.

    .venv/bin/python -m bench.micro_instructions                  # this tree
    .venv/bin/python -m bench.micro_instructions --source DIR     # the proxy package in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPERATIONS = ("clienthello", "request_head", "audit_render")
WARM_UP = 50


def operation(name: str) -> Callable[[], object]:
    """The operation bench.micro times, as one call."""
    from bench import micro

    if name == "clienthello":
        from proxy.core.clienthello import ClientHelloReader

        hello = micro.client_hello_bytes()
        return lambda: ClientHelloReader().feed(hello)
    if name == "request_head":
        from proxy.core.http1 import find_head_end, parse_request_head

        head = micro.REQUEST_HEAD

        def find_and_parse() -> None:
            parse_request_head(head[: find_head_end(head, max_head_bytes=65536)])

        return find_and_parse
    if name == "audit_render":
        return micro.audit_lines(micro.audit_exchange())
    raise ValueError(name)


def run_calls(name: str, calls: int) -> None:
    call = operation(name)
    for _ in range(WARM_UP):
        call()
    for _ in range(calls):
        call()


def instructions(name: str, calls: int, source: Path) -> int:
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=cachegrind",
                "--cache-sim=no",
                f"--cachegrind-out-file={work}/cachegrind.out",
                sys.executable,
                "-c",
                # `proxy` from the source tree, then this tree's bench (its submodules of
                # proxy still come from the package already imported).
                "import sys; sys.path.insert(0, sys.argv[1]); import proxy;"
                " sys.path[0] = sys.argv[2]; import bench.micro_instructions as m;"
                " assert proxy.__file__.startswith(sys.argv[1]), proxy.__file__;"
                " m.run_calls(sys.argv[3], int(sys.argv[4]))",
                str(source),
                str(REPO),
                name,
                str(calls),
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONHASHSEED="0"),
            cwd=source,
            check=False,
        )
        found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
        if out.returncode != 0 or found is None:
            raise RuntimeError(f"valgrind run failed: {out.stderr[-2000:]}")
        return int(found.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO, help="directory holding proxy/")
    parser.add_argument("--calls", type=int, default=4000)
    args = parser.parse_args()
    source = args.source.resolve()
    results = {}
    for name in OPERATIONS:
        per_call = (
            instructions(name, args.calls, source) - instructions(name, 0, source)
        ) / args.calls
        results[name] = round(per_call)
        print(f"{name}: {per_call:,.0f} instructions per call", file=sys.stderr)
    json.dump({"source": str(source), "instructions_per_call": results}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
