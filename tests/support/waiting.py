"""Wait for a condition nothing announces, by polling it under a deadline: a test waits for the
state it is about to assert, never for a guessed number of seconds. On the deadline the error
names what was awaited and what the condition last returned."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Generous for a loaded CI machine: a condition that holds returns at once, so a long deadline
# costs a passing test nothing. A test whose claim is a deadline passes its own.
DEFAULT_TIMEOUT = 15.0
# A synchronous condition usually makes a request per check (an admin call, a proxied GET).
SYNC_INTERVAL = 0.05
# An asynchronous one reads state in the test's own process, and yields the loop between checks.
ASYNC_INTERVAL = 0.02


def wait_for(
    condition: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    *,
    interval: float = SYNC_INTERVAL,
    what: str | None = None,
) -> T:
    """Call `condition` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(condition, timeout, what, value)
        time.sleep(interval)


async def eventually(
    condition: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    *,
    interval: float = ASYNC_INTERVAL,
    what: str | None = None,
) -> T:
    """`wait_for` in a running event loop: the loop runs between checks."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(condition, timeout, what, value)
        await asyncio.sleep(interval)


def _timed_out(
    condition: Callable[[], object], timeout: float, what: str | None, last: object
) -> AssertionError:
    return AssertionError(
        f"not met within {timeout}s: {what or _source_of(condition)} (last returned {last!r})"
    )


def _source_of(condition: Callable[[], object]) -> str:
    """The line that defines the condition (a lambda's is the call awaiting it)."""
    try:
        return " ".join(inspect.getsource(condition).split())
    except (OSError, TypeError):
        return repr(condition)
