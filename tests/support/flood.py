"""A connection flood from one process, for overload tests: open loop, `rate` new connections a
second for `seconds` whatever the answers (each sends one request, reads the status line and
headers, closes), at most MAX_OUTSTANDING at once. A closed loop would slow down with the proxy
and never offer more than it serves. Prints a JSON summary on stdout: statuses, refusals
without Retry-After, errors, and connections not started because MAX_OUTSTANDING were open.

    python -m tests.support.flood PROXY_PORT URL SECONDS RATE
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections import Counter

HEAD_TIMEOUT = 30.0
MAX_OUTSTANDING = 4000
TICK = 0.01


async def _one(port: int, request: bytes, tally: Counter[str]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        tally[f"connect_error_{exc.errno}"] += 1
        return
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        status = int(head.split(b" ", 2)[1])
        tally[str(status)] += 1
        if status in (429, 503) and b"\r\nretry-after:" not in head.lower():
            tally["refused_without_retry_after"] += 1
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        tally[type(exc).__name__] += 1
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            tally["close_error"] += 1


async def flood(port: int, url: str, seconds: float, rate: float) -> Counter[str]:
    host = url.split("/")[2]
    request = f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    tally: Counter[str] = Counter()
    started = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()
    opened = 0
    while (now := time.monotonic()) < started + seconds:
        due = int((now - started) * rate)
        while opened < due:
            opened += 1
            if len(tasks) >= MAX_OUTSTANDING:
                tally["not_started"] += 1
                continue
            task = asyncio.create_task(_one(port, request, tally))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(TICK)
    if tasks:
        await asyncio.wait(tasks)
    return tally


def main() -> None:
    port, url, seconds, rate = sys.argv[1:5]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tally = asyncio.run(flood(int(port), url, float(seconds), float(rate)))
    print(json.dumps(dict(tally)))


if __name__ == "__main__":
    main()
