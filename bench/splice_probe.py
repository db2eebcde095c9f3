"""How much CPU a tunnel's bytes would cost with splice(2) instead of the Protocol relay.

Relays TOTAL_BYTES over loopback through one hop, twice: with proxy.dataplane.peer's relay (each
read becomes a bytes object written to the other transport) and with os.splice through a pipe
(the bytes never enter user space). Prints the relay thread's CPU seconds per GB for each, as one
JSON object. The sender and receiver are threads of this process; only the relaying thread's CPU
(time.thread_time) is counted. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import sys
import threading
import time

import uvloop

from proxy.dataplane.peer import Peer

TOTAL_BYTES = 1 << 30
CHUNK = 1 << 20
PIPE_BYTES = 1 << 20
F_SETPIPE_SZ = 1031  # fcntl(2), Linux
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def _send(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        payload = b"\0" * CHUNK
        left = TOTAL_BYTES
        while left > 0:
            left -= sock.send(payload[: min(left, CHUNK)])


def _receive(server: socket.socket, got: list[int]) -> None:
    conn, _ = server.accept()
    total = 0
    with conn:
        while data := conn.recv(CHUNK):
            total += len(data)
    got.append(total)


async def _splice(client: socket.socket, upstream: socket.socket) -> None:
    """One direction, client -> pipe -> upstream, driven by readiness callbacks."""
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe2(os.O_NONBLOCK)
    fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_BYTES)
    src, dst = client.fileno(), upstream.fileno()
    done: asyncio.Future[None] = loop.create_future()
    in_pipe = 0

    def pump() -> None:
        nonlocal in_pipe
        while True:
            if in_pipe:
                try:
                    in_pipe -= os.splice(read_end, dst, in_pipe, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    loop.remove_reader(src)
                    loop.add_writer(dst, writable)
                    return
                continue
            try:
                moved = os.splice(src, write_end, PIPE_BYTES, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return
            if moved == 0:
                loop.remove_reader(src)
                upstream.shutdown(socket.SHUT_WR)
                done.set_result(None)
                return
            in_pipe += moved

    def writable() -> None:
        loop.remove_writer(dst)
        loop.add_reader(src, pump)
        pump()

    loop.add_reader(src, pump)
    try:
        await done
    finally:
        os.close(read_end)
        os.close(write_end)


async def _relay(mode: str) -> float:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    origin = socket.create_server(("127.0.0.1", 0))
    got: list[int] = []
    receiver = threading.Thread(target=_receive, args=(origin, got))
    receiver.start()
    sender = threading.Thread(target=_send, args=(listener.getsockname()[1],))
    sender.start()
    client, _ = await loop.sock_accept(listener)
    upstream = socket.create_connection(origin.getsockname())
    upstream.setblocking(False)
    started = time.thread_time()
    if mode == "protocol":
        _, near = await loop.connect_accepted_socket(Peer, client)
        _, far = await loop.create_connection(Peer, sock=upstream)
        near.relay(far)
        await near.wait_closed()
        await far.wait_closed()
    else:
        await _splice(client, upstream)
        client.close()
        upstream.close()
    used = time.thread_time() - started
    sender.join()
    receiver.join()
    listener.close()
    origin.close()
    return used / (got[0] / 1e9)


def main() -> int:
    result = {
        "bytes": TOTAL_BYTES,
        "protocol_cpu_s_per_gb": round(uvloop.run(_relay("protocol")), 3),
        "splice_cpu_s_per_gb": round(uvloop.run(_relay("splice")), 3),
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
