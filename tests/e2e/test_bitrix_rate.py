"""The Bitrix24 rate limit holds cluster-wide: two gate clients (as two dispatcher replicas
would hold) book their requests with one ``RateLimiter`` actor of the session's Ray, and
a local server speaking Bitrix's wire format counts what arrives. Killing the actor does
not stop sending: each client falls back to its own limit, then finds a new actor."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import ray

from adapters.bitrix import BitrixChannel, LocalRateGate
from cluster.ratelimit import RateLimiter, SharedRateGate
from cluster.sharding import NAMESPACE, named_actor
from stages.notifications import Delivery, SendStatus
from tests.conftest import App
from tests.integration.test_notify_delivery import FakePortal, running_portal

pytestmark = pytest.mark.e2e
RATE, BURST = 2.0, 2


@pytest.fixture
async def bitrix_portal() -> AsyncIterator[tuple[FakePortal, str]]:
    async with running_portal() as served:
        yield served


async def send_until(ch: BitrixChannel, deadline: float, tag: str) -> int:
    """Sends one notification after another until ``deadline``; returns how many."""
    n = 0
    while time.monotonic() < deadline:
        [r] = await ch.send([Delivery(f"{tag}-{n}", 0, n + 1, "x")])
        assert r.status is SendStatus.DELIVERED, r
        n += 1
    return n


def most_in_window(stamps: list[float], w: float) -> int:
    stamps = sorted(stamps)
    return max(sum(1 for t in stamps[i:] if t <= s + w) for i, s in enumerate(stamps))


async def test_two_clients_share_the_portal_limit_and_survive_the_actor(
        conveyor: App, bitrix_portal: tuple[FakePortal, str]) -> None:
    assert ray.is_initialized()  # the session app's Ray
    fake, url = bitrix_portal
    name = f"conveyor-rate-test-{uuid.uuid4().hex[:8]}"  # not the session app's limiter
    actor = named_actor(RateLimiter, name)
    assert await actor.stats.remote() == {}  # alive before the clock starts
    gates = [SharedRateGate(RATE, BURST, LocalRateGate(RATE, BURST), name=name,
                            timeout_s=10.0, retry_s=1.0) for _ in range(2)]
    # Two "replicas", each with two concurrent senders (rounds may overlap).
    channels = [BitrixChannel(url, gate=g) for g in gates]
    deadline = time.monotonic() + 4.0
    sent = await asyncio.gather(*(send_until(ch, deadline, f"r{i}s{j}")
                                  for i, ch in enumerate(channels) for j in range(2)))
    assert all(n >= 1 for n in sent), sent
    assert [g.local for g in gates] == [0, 0]  # every request was booked with the actor
    booked = await actor.stats.remote()
    assert sum(booked.values()) == sum(g.shared for g in gates) == len(fake.stamps)
    span = fake.stamps[-1] - fake.stamps[0]
    # Together within rate + burst (small slack for scheduling): two per-process limits
    # would let about twice as many through (2 x (2 + 2 x 4) = 20 against at most 12).
    assert len(fake.stamps) <= BURST + RATE * span + 2, (len(fake.stamps), span)
    assert most_in_window(fake.stamps, 1.0) <= BURST + RATE + 1, fake.stamps

    # The actor dies for good: both clients go on sending, paced locally for a while,
    # then book with a new actor (looked up again by name).
    ray.kill(actor, no_restart=True)
    before = len(fake.calls)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and not all(g.local >= 1 for g in gates):
        await asyncio.gather(*(send_until(ch, time.monotonic() + 0.5, f"k{i}")
                               for i, ch in enumerate(channels)))
    assert all(g.local >= 1 for g in gates), [(g.shared, g.local) for g in gates]
    assert len(fake.calls) > before
    shared_after_kill = [g.shared for g in gates]
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and not all(
            g.shared > s for g, s in zip(gates, shared_after_kill, strict=True)):
        await asyncio.gather(*(send_until(ch, time.monotonic() + 0.5, f"b{i}")
                               for i, ch in enumerate(channels)))
    assert all(g.shared > s for g, s in zip(gates, shared_after_kill, strict=True)), \
        [(g.shared, g.local) for g in gates]
    new = ray.get_actor(name, namespace=NAMESPACE)
    assert sum((await new.stats.remote()).values()) >= 2
    ray.kill(new, no_restart=True)
    for ch in channels:
        await ch.close()
