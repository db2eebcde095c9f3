"""Blocking whole writes to a file descriptor, shared by the audit writer and the supervisor."""

from __future__ import annotations

import os
import time


def write_all(fd: int, data: bytes) -> None:
    """Write every byte to `fd`, blocking as long as the reader needs (an audit record is never
    dropped); a non-blocking descriptor is retried every millisecond."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            time.sleep(0.001)
            continue
        view = view[written:]
