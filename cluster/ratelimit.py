"""The cluster-wide ``RateGate``: one named actor reserves send slots for every process.

Callers ask the actor for a slot once per request (``reserve``); the actor books the
earliest slot the limit allows and answers how long the caller must wait for it. The
caller sleeps locally, so the actor call is short and nothing waits inside the actor.
The arithmetic is GCRA (a token bucket of ``burst`` refilled one token every ``1 / rate``
seconds, booked ahead into debt: ``stages.buckets.TokenBuckets.reserve``): over any window
of ``w`` seconds at most ``burst + rate * w`` slots are handed out for a key, whichever
process asks.

The actor is restarted on failure with no memory: the first requests after a restart may
use one more ``burst``. While it cannot be reached (dead, restarting, slower than
``timeout_s``) each client falls back to its process-local gate and logs it, and tries the
actor again after ``retry_s``: losing the actor must not stop the service, it only loosens
the limit to the per-process one for a while.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ray
from ray.exceptions import ActorDiedError

from cluster.sharding import named_actor
from stages.buckets import TokenBuckets
from stages.ports import RateGate

log = logging.getLogger("conveyor.ratelimit")
ACTOR_NAME = "conveyor-rate"


class Slots:
    """GCRA reservations per key: one token bucket of ``burst`` refilled one token every
    ``1 / rate`` seconds (``stages.buckets``), booked into debt. Free of Ray so it can be
    tested directly."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[float, int], TokenBuckets] = {}  # one set per limit
        self.reserved: dict[str, int] = {}

    def reserve(self, key: str, rate: float, burst: int, now: float) -> float:
        """Books the earliest slot for ``key``; returns the seconds until it (0 = now)."""
        limit = (rate, max(1, burst))
        buckets = self._buckets.get(limit)
        if buckets is None:
            buckets = self._buckets[limit] = TokenBuckets(limit[1], 1, 1.0 / rate)
        self.reserved[key] = self.reserved.get(key, 0) + 1
        return buckets.reserve(key, 1, now)

    def forget_idle(self, now: float) -> None:
        """Drop keys whose bucket is full again (their state is the default)."""
        for limit, buckets in list(self._buckets.items()):
            buckets.forget_idle(now)
            if not len(buckets):
                del self._buckets[limit]


@ray.remote
class RateLimiter:
    def __init__(self) -> None:
        self.slots = Slots()
        self._swept = time.monotonic()

    async def reserve(self, key: str, rate: float, burst: int) -> float:
        now = time.monotonic()
        if now - self._swept > 60:
            self._swept = now
            self.slots.forget_idle(now)
        return self.slots.reserve(key, rate, burst, now)

    async def stats(self) -> dict[str, int]:
        return dict(self.slots.reserved)


class SharedRateGate:
    """The ``RateGate`` port over the ``RateLimiter`` actor, with a local fallback."""

    def __init__(self, rate: float, burst: int, fallback: RateGate, *, name: str = ACTOR_NAME,
                 timeout_s: float = 2.0, retry_s: float = 5.0,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.fallback = fallback
        self.name = name
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.sleep = sleep
        self.actor: Any = None  # looked up (or created) on first use
        self._down_until = 0.0  # while the actor is presumed unreachable: the fallback gates
        self.shared = 0  # requests paced by the actor
        self.local = 0  # requests paced by the fallback

    def _handle(self) -> Any:
        if self.actor is None:
            self.actor = named_actor(RateLimiter, self.name)
        return self.actor

    async def acquire(self, key: str) -> None:
        if time.monotonic() >= self._down_until:
            try:
                wait = await asyncio.wait_for(
                    self._handle().reserve.remote(key, self.rate, self.burst), self.timeout_s)
            except Exception as exc:  # dead, restarting, too slow: pace locally for a while
                if self._down_until == 0.0:
                    log.warning("shared rate limiter %s unreachable (%r): pacing %s per process "
                                "for now", self.name, exc, key)
                self._down_until = time.monotonic() + self.retry_s
                if isinstance(exc, ActorDiedError):
                    self.actor = None  # dead for good: look it up (or create it) again
            else:
                if self._down_until != 0.0:
                    log.warning("shared rate limiter %s reachable again", self.name)
                    self._down_until = 0.0
                self.shared += 1
                if wait > 0:
                    await self.sleep(wait)
                return
        self.local += 1
        await self.fallback.acquire(key)
