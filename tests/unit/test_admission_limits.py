"""Admission bookkeeping with a fake clock: connection caps, the per-workload token bucket,
the per-workload tunnel cap, and shedding while the event loop runs behind."""

from __future__ import annotations

import asyncio
import socket
import time
from ipaddress import ip_address

import pytest

from proxy.config import Limits
from proxy.core.identity import UNKNOWN_WORKLOAD, Workload, WorkloadKind
from proxy.dataplane.limits import Admission, LoadMeter, accept_queue, workload_key
from proxy.dataplane.responses import render_error
from proxy.errors import Overloaded, TooManyRequests
from tests.support.waiting import eventually

A = ip_address("10.0.0.1")
B = ip_address("10.0.0.2")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(**limits: float) -> tuple[Admission, Clock]:
    clock = Clock()
    return Admission(Limits(**limits), clock=clock), clock  # type: ignore[arg-type]


def test_global_connection_cap_refuses_the_connection_over_it() -> None:
    adm, _ = admission(max_connections=2)
    for source in (A, B):
        adm.connection_opened(source)
        adm.check_connection(source, "k")
    adm.connection_opened(A)
    with pytest.raises(TooManyRequests) as info:
        adm.check_connection(A, "k")
    assert info.value.status == 429
    adm.connection_closed(A)
    adm.connection_closed(B)
    adm.connection_opened(B)
    adm.check_connection(B, "k")  # room again once connections closed


def test_per_source_cap_counts_each_source_alone() -> None:
    adm, _ = admission(max_connections_per_source=1)
    adm.connection_opened(A)
    adm.check_connection(A, "a")
    adm.connection_opened(B)
    adm.check_connection(B, "b")
    adm.connection_opened(A)
    with pytest.raises(TooManyRequests, match="from this source"):
        adm.check_connection(A, "a")


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    adm, clock = admission(new_connections_per_second=10, new_connections_burst=3)
    for _ in range(3):
        adm.check_connection(A, "w")
    with pytest.raises(TooManyRequests, match="new connections a second"):
        adm.check_connection(A, "w")
    adm.check_connection(A, "other")  # another workload has its own bucket
    clock.now += 0.15  # one and a half tokens back at 10/s: one connection
    adm.check_connection(A, "w")
    with pytest.raises(TooManyRequests):
        adm.check_connection(A, "w")
    clock.now += 60  # refills only up to the burst
    for _ in range(3):
        adm.check_connection(A, "w")
    with pytest.raises(TooManyRequests):
        adm.check_connection(A, "w")


def test_tunnel_cap_is_per_workload_and_released_on_close() -> None:
    adm, _ = admission(max_tunnels_per_workload=2)
    adm.open_tunnel("w")
    adm.open_tunnel("w")
    adm.open_tunnel("v")
    with pytest.raises(TooManyRequests, match="open tunnels"):
        adm.open_tunnel("w")
    adm.close_tunnel("w")
    adm.open_tunnel("w")


def test_workload_key_groups_pods_by_owner_and_keeps_unknown_sources_apart() -> None:
    pod = Workload(
        kind=WorkloadKind.POD,
        namespace="pay",
        name="api-1",
        owner_kind="Deployment",
        owner_name="api",
    )
    sibling = Workload(
        kind=WorkloadKind.POD,
        namespace="pay",
        name="api-2",
        owner_kind="Deployment",
        owner_name="api",
    )
    assert workload_key(pod, A) == workload_key(sibling, B) == "pay/Deployment/api"
    assert workload_key(UNKNOWN_WORKLOAD, A) != workload_key(UNKNOWN_WORKLOAD, B)


def test_a_new_connection_is_shed_with_503_while_the_loop_is_behind() -> None:
    lag = [0.0]
    adm = Admission(Limits(shed_loop_lag=0.25), lag=lambda: lag[0])
    adm.connection_opened(A)
    adm.check_connection(A, "k")  # on time: admitted
    lag[0] = 0.3
    with pytest.raises(Overloaded) as info:
        adm.check_connection(A, "k")
    assert (info.value.status, str(info.value.reason)) == (503, "overloaded")
    lag[0] = 0.2
    adm.check_connection(A, "k")  # caught up: admitted again


def test_shedding_off_admits_whatever_the_lag() -> None:
    adm = Admission(Limits(shed_loop_lag=0.0), lag=lambda: 10.0)
    adm.connection_opened(A)
    adm.check_connection(A, "k")


def test_loop_lag_sees_a_loop_behind_tick_after_tick_and_forgets_a_single_stall() -> None:
    async def measure() -> tuple[float, float, float]:
        meter = LoadMeter(tick=0.01)
        lag = meter.lag
        ticking = asyncio.create_task(meter.run())
        await asyncio.sleep(0.05)
        idle = lag()
        for _ in range(6):  # a backlog: every turn of the loop takes 0.3 s
            time.sleep(0.3)
            await asyncio.sleep(0)
        behind = lag()
        await asyncio.sleep(0.1)  # on time again
        time.sleep(1.0)  # one stall (a stopped process looks the same): the first connection
        await asyncio.sleep(0)  # after it must not be shed
        after_stall = lag()
        ticking.cancel()
        return idle, behind, after_stall

    idle, behind, after_stall = asyncio.run(measure())
    # A busy machine makes ticks a little late; only a backlog makes two in a row 0.25 s late.
    assert idle < 0.25
    assert behind >= 0.25
    assert after_stall < 0.25


def test_a_new_connection_is_shed_with_503_while_an_accept_queue_stays_full() -> None:
    fill = [0.0]
    adm = Admission(Limits(shed_accept_queue=0.5), accept_queue_fill=lambda: fill[0])
    adm.connection_opened(A)
    adm.check_connection(A, "k")
    fill[0] = 0.5
    with pytest.raises(Overloaded) as info:
        adm.check_connection(A, "k")
    assert (info.value.status, str(info.value.reason)) == (503, "overloaded")
    assert "accept queue 50% full" in str(info.value)
    fill[0] = 0.4
    adm.check_connection(A, "k")
    off = Admission(Limits(shed_accept_queue=0.0), accept_queue_fill=lambda: 1.0)
    off.connection_opened(A)
    off.check_connection(A, "k")


def test_the_meter_reads_a_real_accept_queue_filling_and_draining() -> None:
    """Connections the kernel completed but nobody accepted yet fill the listening socket's
    queue; the meter reads it (TCP_INFO), and once they are accepted it reads empty again."""

    async def measure() -> tuple[tuple[int, int] | None, float, float]:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            clients = [socket.create_connection(listener.getsockname()) for _ in range(6)]
            try:
                queue = accept_queue(listener)
                meter = LoadMeter(tick=0.01)
                meter.watch([listener])
                ticking = asyncio.create_task(meter.run())
                full = await eventually(meter.accept_queue_fill, what="a full queue read")
                for _ in clients:
                    listener.accept()[0].close()
                await eventually(lambda: meter.accept_queue_fill() == 0.0, what="drained")
                drained = meter.accept_queue_fill()
                ticking.cancel()
                return queue, full, drained
            finally:
                for client in clients:
                    client.close()

    queue, full, drained = asyncio.run(measure())
    # The kernel's limit is the backlog asked for (somaxconn permitting).
    assert queue is not None and queue[0] == 6 and queue[1] >= 6, queue
    assert full == 6 / queue[1]
    assert drained == 0.0


def test_an_overloaded_refusal_says_when_to_retry() -> None:
    head = render_error(
        Overloaded("behind"), event_id="e", workload="w", destination="d", keep_alive=False
    ).split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 1" in head
