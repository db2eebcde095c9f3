"""Leave no socket behind when a test's event loop ends.

A transport closed in a test's last steps (a client library that gave up after a refusal, a
connection the proxy cut) finishes closing on a later loop iteration. If the loop closes first,
the transport is collected later, in whichever test is running then, and its ResourceWarning
fails that test (filterwarnings = error). The selector loop keeps its open transports in
`_transports` (a WeakValueDictionary by descriptor): run the loop until it holds none.
"""

from __future__ import annotations

import asyncio

# Loop iterations always given first: most transports finish closing in one or two.
SETTLE_ITERATIONS = 3


async def settle_transports(timeout: float) -> None:
    """Run the loop until every transport it holds has closed (aborting what is still open),
    for at most `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in range(SETTLE_ITERATIONS):
        await asyncio.sleep(0)
    while getattr(loop, "_transports", None) and loop.time() < deadline:
        for transport in list(loop._transports.values()):  # type: ignore[attr-defined]
            if not transport.is_closing():
                transport.abort()
        await asyncio.sleep(0)
