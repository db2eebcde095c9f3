"""A scripted TCP upstream on loopback: each accepted connection runs a test's handler, so a
test can answer with garbage, reset mid-body, or stall — the faults a real origin can have."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

Handler = Callable[[socket.socket], None]


def read_head(conn: socket.socket) -> bytes:
    """Read up to the end of a request head (what the proxy sends first)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def reset(conn: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class RawServer:
    def __init__(self, handler: Handler, *, port: int = 0) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self.received: list[bytes] = []
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(10)
            with contextlib.suppress(OSError), conn:
                self.handler(conn)

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.listener.close()
