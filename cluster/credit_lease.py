"""``LeasedCredits``: the ``CreditBank`` port with a per-gateway lease of each active
user's credits, so most batches are debited without a call to the bank.

A gateway takes what a batch is missing of a user's credits from the bank (``lease``)
and spends it locally; a user's lease that falls below half of its size is topped up in
the background, one bank call for every such user, so the next batches need no call at
all. A lease starts at ``lease_size``; each time a user's batch finds it dry (a bank call
or a wait for the top-up on the batch's path) it doubles, up to ``max_lease``, so a busy
sender needs about one bank call per lease rather than one per batch.
The cluster-wide limit still holds: a credit is spent only after the bank handed it out,
so all gateways together never spend more than the bank's buckets allow. What a lease
costs: credits leased to one gateway cannot be spent on another, so a user switching
gateways may be refused up to a lease's size of credits early until the idle lease is given
back (``refund`` after ``idle_s`` without use, or when the process stops). A lost
process loses its leases (the bank errs, as everywhere, towards letting people talk:
those credits are simply gone until the next refill).

Guarantees are those of ``CreditBank``: each request is granted in full or refused, in
the order given; a refusal says when enough credits will be back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from stages.buckets import Lease
from stages.ports import Debit

log = logging.getLogger("conveyor.credits")


class LeasingBank(Protocol):
    async def lease(self, requests: Sequence[tuple[str, int]]) -> list[Lease]: ...

    async def refund(self, returns: Sequence[tuple[str, int]]) -> None: ...


@dataclass
class _Held:
    credits: int = 0
    bank_left: int = 0  # what the bank said was left at the last lease (for credits_low)
    used_at: float = field(default_factory=time.monotonic)
    size: int = 0  # this user's lease size (grows while the lease runs dry)


class LeasedCredits:
    def __init__(self, bank: LeasingBank, lease_size: int = 10, idle_s: float = 30.0,
                 max_lease: int = 1000) -> None:
        self.bank = bank
        self.lease_size = max(1, lease_size)
        self.max_lease = max(self.lease_size, max_lease)
        self.idle_s = idle_s
        self.held: dict[str, _Held] = {}
        self.bank_calls = 0
        self._topping: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None

    async def debit(self, requests: Sequence[tuple[str, int]]) -> list[Debit]:
        need: dict[str, int] = {}
        for user, cost in requests:
            need[user] = need.get(user, 0) + cost
        # A lease that ran dry (not a first one) was too small for this user's pace.
        for user in [u for u, n in need.items() if u in self.held and self.held[u].credits < n]:
            self.held[user].size = min(self.held[user].size * 2, self.max_lease)
        dry = [u for u, n in need.items() if self._held(u).credits < n]
        if dry and self._topping is not None and not self._topping.done():
            # A top-up on its way may cover what is short: wait for it rather than race it
            # at the bank (which could refuse now what the top-up is bringing).
            await asyncio.shield(self._topping)
        now = time.monotonic()
        # Exactly what is missing (so a refusal's retry time is right); the background
        # top-up adds the rest of a lease.
        short = [(u, n - self._held(u).credits) for u, n in need.items()
                 if self._held(u).credits < n]
        retry: dict[str, float] = {}
        if short:
            for (user, _), got in zip(short, await self._lease(short), strict=True):
                retry[user] = got.retry_after
        out: list[Debit] = []
        for user, cost in requests:
            h = self._held(user)
            h.used_at = now
            if h.credits >= cost:
                h.credits -= cost
                out.append(Debit(True, h.credits + h.bank_left, 0.0))
            else:
                out.append(Debit(False, h.credits + h.bank_left, retry.get(user, 0.0)))
        self._top_up_soon()
        return out

    def _held(self, user: str) -> _Held:
        h = self.held.get(user)
        if h is None:
            h = self.held[user] = _Held(size=self.lease_size)
        return h

    async def _lease(self, wants: list[tuple[str, int]]) -> list[Lease]:
        self.bank_calls += 1
        got = await self.bank.lease(wants)
        for (user, _), g in zip(wants, got, strict=True):
            h = self._held(user)
            h.credits += g.taken
            h.bank_left = g.remaining
        return got

    def _top_up_soon(self) -> None:
        """Leases below half are topped up in the background (one bank call)."""
        low = [(u, h.size - h.credits) for u, h in self.held.items()
               if h.credits < h.size // 2 and h.bank_left > 0]
        if not low or (self._topping is not None and not self._topping.done()):
            return
        self._topping = asyncio.get_running_loop().create_task(self._top_up(low))
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._give_back_idle())

    async def _top_up(self, wants: list[tuple[str, int]]) -> None:
        try:
            await self._lease(wants)
        except Exception as exc:  # the next batch that is short asks again, and reports it
            log.info("credit lease top-up failed: %r", exc)

    async def _give_back_idle(self) -> None:
        while True:
            await asyncio.sleep(max(self.idle_s / 2, 0.05))
            with contextlib.suppress(Exception):
                await self.give_back(idle_only=True)

    async def give_back(self, idle_only: bool = False) -> int:
        """Refund leases (only those unused for ``idle_s`` when ``idle_only``)."""
        now = time.monotonic()
        back = [(u, h.credits) for u, h in self.held.items()
                if h.credits > 0 and (not idle_only or now - h.used_at >= self.idle_s)]
        for u, _ in back:
            del self.held[u]
        if back:
            await self.bank.refund(back)
        for u in [u for u, h in self.held.items() if h.credits == 0
                  and now - h.used_at >= self.idle_s]:
            del self.held[u]
        return sum(n for _, n in back)
