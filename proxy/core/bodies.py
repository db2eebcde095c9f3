"""One reader per body framing (RFC 9112 section 6.3), for the one relay loop that moves bodies.

Pure, sans-I/O. A reader is fed the bytes that arrive and returns the payload they carry; the
relay (proxy.dataplane.http_relay) owns the sockets, the deadlines and how the payload is framed
again on the other side. `body_reader` is the table from a message's framing to its reader, as
h11 keeps one table of readers.

  - LENGTH: exactly Content-Length bytes. `want` caps each read at what is left, so no byte of a
    next pipelined message is ever taken as body.
  - CHUNKED: the chunked decoder of proxy.core.http1 itself (a reader as it is); only chunk
    payloads come out (chunk lines, extensions and trailers never pass through), and what
    follows the last chunk is `tail`.
  - UNTIL_CLOSE (responses only): everything until the upstream closes.
  - NONE: no reader; there is no body to move.
"""

from __future__ import annotations

from typing import Final, Protocol

from proxy.core.http1 import BodyFraming, ChunkedDecoder

# Bytes taken per read when relaying a framed body: the peers' read-buffer limit.
RELAY_CHUNK_BYTES: Final = 256 * 1024


class BodyReader(Protocol):
    @property
    def done(self) -> bool:
        """The whole body has been read."""
        ...

    @property
    def want(self) -> int | None:
        """The most bytes the next read may take (None: any)."""
        ...

    @property
    def ends_at_eof(self) -> bool:
        """An EOF is this body's end rather than a cut-off body."""
        ...

    def feed(self, data: bytes) -> list[bytes]:
        """The payload in `data`."""
        ...

    def tail(self) -> bytes:
        """Bytes fed after the body's end (the start of a next message)."""
        ...


class LengthReader:
    __slots__ = ("_remaining", "_tail")

    def __init__(self, length: int) -> None:
        self._remaining = length
        self._tail = b""

    @property
    def done(self) -> bool:
        return self._remaining == 0

    @property
    def want(self) -> int:
        return min(self._remaining, RELAY_CHUNK_BYTES)

    @property
    def ends_at_eof(self) -> bool:
        return False

    def feed(self, data: bytes) -> list[bytes]:
        if len(data) > self._remaining:
            self._tail += data[self._remaining :]
            data = data[: self._remaining]
        self._remaining -= len(data)
        return [data]

    def tail(self) -> bytes:
        return self._tail


class UntilCloseReader:
    __slots__ = ()

    @property
    def done(self) -> bool:
        return False  # only the EOF ends it

    @property
    def want(self) -> int:
        return RELAY_CHUNK_BYTES

    @property
    def ends_at_eof(self) -> bool:
        return True

    def feed(self, data: bytes) -> list[bytes]:
        return [data]

    def tail(self) -> bytes:
        return b""


def body_reader(
    framing: BodyFraming, content_length: int | None, *, upstream: bool
) -> BodyReader | None:
    """The reader for a message body framed as `framing`; None when there is no body.
    `upstream` chooses the chunked decoder's error (502 for an upstream, 400 for a client)."""
    if framing is BodyFraming.LENGTH:
        return LengthReader(content_length or 0)
    if framing is BodyFraming.CHUNKED:
        return ChunkedDecoder(upstream=upstream)
    if framing is BodyFraming.UNTIL_CLOSE:
        return UntilCloseReader()
    return None
