"""The idle deadlines every relay wait of a loop shares (proxy.dataplane.peer.IdleDeadlines):
each wait woken once, in deadline order, behind one loop timer; a wait that ends early leaves
no entry behind for long; an empty clock is forgotten."""

from __future__ import annotations

import asyncio

from proxy.dataplane.peer import IdleDeadlines, RelayWait
from tests.support.inprocess import EVENT_TIMEOUT


class Recorded(RelayWait):
    """A wait that notes when its deadline wakes it."""

    __slots__ = ("all_woken", "expected", "name", "woken")

    def __init__(self, name: str, woken: list[str], all_woken: asyncio.Future[None], n: int):
        super().__init__()
        self.name, self.woken, self.all_woken, self.expected = name, woken, all_woken, n

    def wake(self) -> None:
        self.woken.append(self.name)
        if len(self.woken) == self.expected:
            self.all_woken.set_result(None)


async def test_waits_are_woken_once_each_in_deadline_order_and_an_ended_one_never() -> None:
    loop = asyncio.get_running_loop()
    woken: list[str] = []
    all_woken = loop.create_future()
    deadlines = IdleDeadlines.of(loop)
    now = loop.time()
    for name, delay in [("third", 0.15), ("first", 0.05), ("second", 0.10)]:
        deadlines.add(now + delay, Recorded(name, woken, all_woken, 3))
    ended = deadlines.add(now + 0.07, Recorded("ended", woken, all_woken, 3))
    deadlines.discard(ended)
    assert len(deadlines) == 3
    await asyncio.wait_for(all_woken, EVENT_TIMEOUT)
    assert woken == ["first", "second", "third"]
    assert loop.time() - now >= 0.15
    assert loop not in IdleDeadlines._by_loop  # empty: forgotten


async def test_waits_that_end_before_their_deadline_do_not_pile_up() -> None:
    loop = asyncio.get_running_loop()
    woken: list[str] = []
    never = loop.create_future()
    deadlines = IdleDeadlines.of(loop)
    hour = loop.time() + 3600
    kept = deadlines.add(hour, Recorded("kept", woken, never, 1))
    for n in range(5000):  # tunnels that open and close well within the idle timeout
        deadlines.discard(deadlines.add(hour + n, Recorded(str(n), woken, never, 1)))
    assert len(deadlines) == 1
    assert len(deadlines._heap) <= 2 * IdleDeadlines.COMPACT_AFTER + 2
    deadlines.discard(kept)
    assert loop not in IdleDeadlines._by_loop
    assert woken == []
