"""The credit bank: per-user token buckets in sharded actors (users hashed onto shards).

A bucket holds up to ``capacity`` credits and gets ``refill`` credits back every
``interval_s`` (discrete refills, as the seed describes: "every 10 seconds"). A debit is
granted in full or refused; a refusal says when enough credits will be back.

If a shard actor dies it is restarted empty: its users' buckets start full again. That is
deliberate: the bank limits abuse, it is not a ledger, and losing it must not stop anyone
from talking. Gateways call one shard once per batch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Sequence

import ray

from cluster.sharding import named_actor, shard_of
from stages.ports import Debit


class Buckets:
    """The token-bucket arithmetic, kept free of Ray so it can be tested directly."""

    def __init__(self, capacity: int, refill: int, interval_s: float) -> None:
        self.capacity = capacity
        self.refill = refill
        self.interval_s = interval_s
        self._state: dict[str, tuple[float, float]] = {}  # user -> (tokens, last refill time)

    def debit(self, user: str, cost: int, now: float) -> Debit:
        tokens, last = self._state.get(user, (float(self.capacity), now))
        periods = math.floor((now - last) / self.interval_s) if self.interval_s > 0 else 0
        if periods > 0:
            tokens = min(float(self.capacity), tokens + periods * self.refill)
            last += periods * self.interval_s
        if tokens >= cost:
            tokens -= cost
            self._state[user] = (tokens, last)
            return Debit(True, int(tokens), 0.0)
        self._state[user] = (tokens, last)
        if cost > self.capacity or self.refill <= 0:
            return Debit(False, int(tokens), float("inf"))
        missing_periods = math.ceil((cost - tokens) / self.refill)
        retry = last + missing_periods * self.interval_s - now
        return Debit(False, int(tokens), max(retry, 0.0))

    def forget_idle(self, now: float) -> None:
        """Drop buckets that would be full anyway (keeps memory to active users)."""
        full_after = self.interval_s * math.ceil(self.capacity / max(self.refill, 1))
        for user in [u for u, (_, last) in self._state.items() if now - last > full_after]:
            del self._state[user]

    def __len__(self) -> int:
        return len(self._state)


@ray.remote
class CreditShard:
    def __init__(self, capacity: int, refill: int, interval_s: float) -> None:
        self.buckets = Buckets(capacity, refill, interval_s)
        self.granted = 0
        self.refused = 0
        self._swept = time.monotonic()

    async def debit(self, requests: Sequence[tuple[str, int]]) -> list[Debit]:
        now = time.monotonic()
        out = [self.buckets.debit(user, cost, now) for user, cost in requests]
        self.granted += sum(d.granted for d in out)
        self.refused += sum(not d.granted for d in out)
        if now - self._swept > 60:
            self._swept = now
            self.buckets.forget_idle(now)
        return out

    async def stats(self) -> dict[str, int]:
        return {"users": len(self.buckets), "granted": self.granted, "refused": self.refused}


class CreditBankClient:
    """The ``CreditBank`` port over the shards: one call per shard per batch."""

    def __init__(self, shards: int, capacity: int, refill: int, interval_s: float) -> None:
        self.n = max(1, shards)
        self.actors = [
            named_actor(CreditShard, f"conveyor-credits-{i}", capacity, refill, interval_s)
            for i in range(self.n)
        ]

    async def debit(self, requests: Sequence[tuple[str, int]]) -> list[Debit]:
        parts: dict[int, list[int]] = defaultdict(list)
        for i, (user, _) in enumerate(requests):
            parts[shard_of(user, self.n)].append(i)
        calls = {s: self.actors[s].debit.remote([requests[i] for i in idx]) for s, idx in parts.items()}
        results = dict(zip(calls, await asyncio.gather(*calls.values()), strict=True))
        out: list[Debit | None] = [None] * len(requests)
        for s, idx in parts.items():
            for i, d in zip(idx, results[s], strict=True):
                out[i] = d
        return [d for d in out if d is not None]
