"""The shared rate gate without Ray: the slot arithmetic, and the fallback when the actor
cannot be reached."""

from __future__ import annotations

from typing import Any

from adapters.bitrix import LocalRateGate
from cluster.ratelimit import SharedRateGate, Slots


def test_slots_give_the_burst_at_once_then_one_per_interval() -> None:
    slots = Slots()
    waits = [slots.reserve("p", 2.0, 2, 100.0) for _ in range(5)]
    assert waits == [0.0, 0.0, 0.5, 1.0, 1.5]
    assert slots.reserve("other", 2.0, 2, 100.0) == 0.0  # keys are independent
    # after a quiet spell the burst is back, never more than it
    assert [slots.reserve("p", 2.0, 2, 110.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert slots.reserved == {"p": 8, "other": 1}


def test_slots_hold_rate_plus_burst_over_any_window() -> None:
    slots = Slots()
    sends: list[float] = []
    now = 0.0
    for i in range(200):  # callers arriving irregularly, each sending at its slot
        now += (i % 7) * 0.05
        sends.append(now + slots.reserve("p", 2.0, 3, now))
    sends.sort()
    for i, start in enumerate(sends):
        for w in (0.0, 0.5, 1.0, 5.0):
            inside = sum(1 for t in sends[i:] if t <= start + w + 1e-9)
            assert inside <= 3 + 2.0 * w, (start, w, inside)


def test_forget_idle_drops_only_full_buckets() -> None:
    slots = Slots()
    slots.reserve("busy", 1.0, 1, 0.0)
    slots.reserve("busy", 1.0, 1, 0.0)
    slots.reserve("idle", 1.0, 1, 0.0)
    slots.forget_idle(1.5)
    assert slots.reserve("busy", 1.0, 1, 1.5) == 0.5  # still booked until 2.0
    assert slots.reserve("idle", 1.0, 1, 1.5) == 0.0


class Unreachable:
    """An actor handle whose calls fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.reserve = self

    def remote(self, *args: Any) -> Any:
        self.calls += 1

        async def fail() -> float:
            raise ConnectionError("actor gone")

        return fail()


class Answering:
    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.reserve = self

    def remote(self, key: str, rate: float, burst: int) -> Any:
        async def answer() -> float:
            return self.wait

        return answer()


async def test_shared_gate_sleeps_what_the_actor_says() -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    gate = SharedRateGate(2.0, 2, LocalRateGate(2.0, 2), sleep=sleep)
    gate.actor = Answering(0.25)
    await gate.acquire("p")
    assert slept == [0.25] and (gate.shared, gate.local) == (1, 0)


async def test_shared_gate_falls_back_to_the_local_gate_and_retries_later() -> None:
    local = LocalRateGate(100.0, 1)
    gate = SharedRateGate(2.0, 2, local, retry_s=3600)
    dead = gate.actor = Unreachable()
    for _ in range(3):
        await gate.acquire("p")
    assert (gate.shared, gate.local) == (0, 3)
    assert dead.calls == 1  # not asked again before retry_s
    assert set(local.buckets) == {"p"}
    gate._down_until = 1.0  # retry_s has passed
    gate.actor = Answering(0.0)
    await gate.acquire("p")
    assert (gate.shared, gate.local) == (1, 3)
