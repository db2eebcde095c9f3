"""File descriptors: blocking whole writes (the audit writer and the supervisor), and PEM bytes
given to `ssl` as a path without a file (TLS leaves, kubeconfig client certificates)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def pem_path(data: bytes) -> Iterator[str]:
    """A path `load_cert_chain` can read (it takes no bytes). On Linux an anonymous memfd: the
    key never touches a filesystem, and a read-only root filesystem without /tmp is no obstacle.
    Elsewhere a 0600 file in a private temporary directory, removed at once.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("outgate-pem", os.MFD_CLOEXEC)
        try:
            write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="outgate-pem-") as directory:
        path = Path(directory) / "chain.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        yield str(path)
