"""A test origin stopped while a peer has stopped reading its download leaves no socket behind.

aiohttp closes such a connection with `transport.close()`, which waits for the unsent bytes to
drain before closing the socket: never, for a stalled peer. Its transport was then collected in
a later test, whose `ResourceWarning` failed that test (the intermittent failure seen in
test_hardening and test_upgrades). tests/support/loops.py aborts it when the origin stops.
"""

from __future__ import annotations

import gc
import socket
import warnings

from tests.support.origin import OriginServer
from tests.support.waiting import wait_for


def test_stopping_an_origin_under_a_stalled_download_closes_its_socket() -> None:
    origin = OriginServer().start()
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", origin.port))
        client.sendall(f"GET /bytes/{64 * 1024 * 1024} HTTP/1.1\r\nHost: origin\r\n\r\n".encode())
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
        # The origin has written all the kernel takes: its transport holds unsent bytes.
        wait_for(lambda: origin.pending_writes() > 0, what="the origin's write buffer in use")
        origin.stop()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []
