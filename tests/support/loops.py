"""Leave no socket behind when a test's event loop ends.

A transport closed in a test's last steps (a client library that gave up after a refusal, a
connection the proxy cut) finishes closing on a later loop iteration. If the loop closes first,
the transport is collected later, in whichever test is running then, and its ResourceWarning
fails that test (filterwarnings = error). The selector loop keeps its open transports in
`_transports` (a WeakValueDictionary by descriptor): abort what is still open there, then run
the loop until their sockets are closed. "Still open" includes a transport already closing
with unsent bytes for a peer that stopped reading (an origin streaming to a stalled proxy):
it would wait for ever to flush.
"""

from __future__ import annotations

import asyncio

# Loop iterations always given first: most transports finish closing in one or two.
SETTLE_ITERATIONS = 3


async def settle_transports() -> None:
    """Let closing transports finish, abort the ones still open, and let those finish too: a
    transport's socket is closed by its connection_lost callback, one loop iteration after
    close() or abort()."""
    loop = asyncio.get_running_loop()
    for _ in range(SETTLE_ITERATIONS):
        await asyncio.sleep(0)
    transports = getattr(loop, "_transports", None) or {}
    for transport in list(transports.values()):
        # Closing ones too: close() with bytes still buffered for a peer that stopped reading
        # waits for the buffer to drain before it closes the socket, which never happens.
        # abort() drops the buffer; on a transport already lost it does nothing.
        transport.abort()
    for _ in range(SETTLE_ITERATIONS):
        await asyncio.sleep(0)
