"""One file the proxy keeps in force while it changes (the hosts file, the proxy-auth password
file): read at start, polled, re-read on change, and on a bad read the last good content stays.

Polled for the reason proxy.control.policy_source gives: a Kubernetes ConfigMap or Secret update
is an atomic symlink swap that inotify on the file misses, and `stat` sees every kind of change.
The fingerprint is (mtime_ns, size, inode), or None when the file is missing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

# A saved file is in force within a second; a stat a second costs nothing measurable.
POLL_INTERVAL = 1.0

T = TypeVar("T")
_Fingerprint = tuple[int, int, int] | None


class FileLoadError(Exception):
    """Raised by a loader: the file is unusable as a whole (the message says why)."""


def _fingerprint(path: Path) -> _Fingerprint:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class WatchedFile(Generic[T]):
    """`current` is the last good load of `path` by `load(text) -> T` (`empty` until one)."""

    def __init__(
        self,
        path: Path,
        *,
        load: Callable[[str], T],
        empty: T,
        event: str,
        max_bytes: int,
        missing_ok: bool,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = path
        self.current = empty
        self.loaded = False
        self.last_error: str | None = None  # why the last read failed; None after a good one
        self._load = load
        self._event = event  # log event prefix: hosts_file, proxy_auth_file
        self._max_bytes = max_bytes
        self._missing_ok = missing_ok
        self._interval = interval
        self._seen: _Fingerprint | object = object()  # never equal to a fingerprint at first

    def reload(self) -> bool:
        """Read and load the file now; on failure keep `current`, log why and return False."""
        self._seen = _fingerprint(self.path)
        try:
            with open(self.path, "rb") as f:
                data = f.read(self._max_bytes + 1)
        except FileNotFoundError:
            if self._missing_ok:
                log.info(f"{self._event}_missing", path=str(self.path))
                return False
            return self._failed("the file does not exist")
        except OSError as exc:
            return self._failed(exc.strerror or str(exc))
        if len(data) > self._max_bytes:
            return self._failed(f"larger than {self._max_bytes} bytes")
        try:
            self.current = self._load(data.decode("utf-8", errors="replace"))
        except FileLoadError as exc:
            return self._failed(str(exc))
        self.loaded = True
        self.last_error = None
        log.info(f"{self._event}_loaded", path=str(self.path))
        return True

    def _failed(self, why: str) -> bool:
        self.last_error = why
        log.error(
            f"{self._event}_reload_failed",
            path=str(self.path),
            error=why,
            effect="the last good content stays in force" if self.loaded else "nothing loaded",
        )
        return False

    def changed(self) -> bool:
        return _fingerprint(self.path) != self._seen

    async def run(self) -> None:
        """Poll every `interval` seconds and reload on change, until cancelled."""
        await poll_for_changes(
            self._interval, self.changed, self.reload, error_event=f"{self._event}_watch_error"
        )


async def poll_for_changes(
    interval: float,
    changed: Callable[[], bool],
    reload: Callable[[], object],
    *,
    error_event: str,
) -> None:
    """Every `interval` seconds ask `changed`, and `reload` when it says so, both in a thread
    (stat and parse stay off the event loop), until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            if await asyncio.to_thread(changed):
                await asyncio.to_thread(reload)
        except Exception:
            # A bug must not end reloading for the life of the process: what is in force
            # stays, and the next change is tried again.
            log.exception(error_event)
