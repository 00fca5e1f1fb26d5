"""Keyed token buckets: the one arithmetic behind credits and rate limits.

A bucket holds up to ``capacity`` tokens and gets ``refill`` tokens back every
``interval_s`` while it is not full (discrete refills: "2 credits every 10 seconds"). The
refill clock starts when a full bucket is first drawn from, so a bucket that sat full
saves nothing up: forgetting a full bucket and meeting its key again as a new one are the
same thing.

Two ways to take tokens:

- ``debit`` grants a request in full or refuses it, and a refusal says when enough tokens
  will be back (the credit bank).
- ``reserve`` always books the tokens, into debt if need be, and answers how long the
  caller must wait until they are covered (a rate gate: the caller sleeps, then sends).
  Later reservations queue behind the debt. With unit costs, ``capacity = burst``,
  ``refill = 1`` and ``interval_s = 1 / rate`` this is exactly GCRA: over any window of
  ``w`` seconds at most ``burst + rate * w`` reservations come due for a key.

Time is whatever clock the caller passes as ``now`` (seconds, non-decreasing per key).
Nothing here does I/O or keeps time itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from stages.ports import Debit

INF = float("inf")


@dataclass(frozen=True, slots=True)
class Lease(Debit):
    """A ``take``: a ``Debit`` that also says how many tokens were taken."""

    taken: int = 0


class TokenBuckets:
    """Token buckets per key, all with the same ``capacity``, ``refill`` and ``interval_s``.

    A key never seen has a full bucket. A bucket may go negative (debt) only through
    ``reserve``. ``interval_s <= 0`` or ``refill <= 0`` means tokens never come back.
    """

    def __init__(self, capacity: int, refill: int, interval_s: float) -> None:
        self.capacity = capacity
        self.refill = refill
        self.interval_s = interval_s
        # key -> (tokens, time of the last refill), for keys drawn from; absent = full
        self._state: dict[str, tuple[float, float]] = {}

    def _refills(self) -> bool:
        return self.refill > 0 and self.interval_s > 0

    def _at(self, key: str, now: float) -> tuple[float, float]:
        """(tokens, refill clock) of ``key`` at ``now``, refills applied."""
        state = self._state.get(key)
        if state is None:
            return float(self.capacity), now
        tokens, last = state
        if self._refills() and now > last:
            periods = math.floor((now - last) / self.interval_s)
            if periods > 0:
                tokens += periods * self.refill
                last += periods * self.interval_s
        if tokens >= self.capacity:  # full: nothing is saved up beyond it, the clock stops
            return float(self.capacity), now
        return tokens, last

    def _covered_in(self, missing: float, last: float, now: float) -> float:
        """Seconds from ``now`` until refills after ``last`` bring ``missing`` tokens."""
        if missing <= 0:
            return 0.0
        if not self._refills():
            return INF
        periods = math.ceil(missing / self.refill)
        return max(last + periods * self.interval_s - now, 0.0)

    def level(self, key: str, now: float) -> float:
        """Tokens in ``key``'s bucket at ``now`` (negative: reserved ahead, in debt)."""
        return self._at(key, now)[0]

    def debit(self, key: str, cost: int, now: float) -> Debit:
        """Takes ``cost`` tokens if the bucket holds them all; otherwise takes none and
        says when it will (``inf`` if never: more than ``capacity``, or no refills)."""
        tokens, last = self._at(key, now)
        if tokens >= cost:
            self._state[key] = (tokens - cost, last)
            return Debit(True, max(int(tokens - cost), 0), 0.0)
        self._state[key] = (tokens, last)
        if cost > self.capacity:
            return Debit(False, max(int(tokens), 0), INF)
        return Debit(False, max(int(tokens), 0), self._covered_in(cost - tokens, last, now))

    def reserve(self, key: str, cost: int, now: float) -> float:
        """Books ``cost`` tokens, into debt if the bucket is short, and returns the seconds
        from ``now`` until they are covered (0: use them now). Reservations for one key
        come due in the order they were made."""
        tokens, last = self._at(key, now)
        tokens -= cost
        self._state[key] = (tokens, last)
        return self._covered_in(-tokens, last, now)

    def take(self, key: str, want: int, now: float) -> Debit:
        """Takes as many whole tokens as the bucket holds, up to ``want`` (a lease of
        credits handed to a gateway). ``remaining`` is what is left; ``retry_after`` the
        seconds until the part not granted would be back (0 when all was granted).
        ``granted`` is True when anything was taken; ``Lease.taken`` says how much."""
        tokens, last = self._at(key, now)
        taken = max(0, min(want, math.floor(tokens)))
        tokens -= taken
        self._state[key] = (tokens, last)
        short = want - taken
        # Until the part not granted is back; a part larger than the bucket: until it is
        # full again (then at least the next request can pass).
        retry = 0.0 if short <= 0 else self._covered_in(min(short, self.capacity) - tokens,
                                                        last, now)
        return Lease(taken > 0, max(int(tokens), 0), retry, taken)

    def give(self, key: str, tokens: int, now: float) -> None:
        """Gives back tokens taken and not used (never above ``capacity``)."""
        level, last = self._at(key, now)
        self._state[key] = (min(float(self.capacity), level + tokens), last)

    def forget_idle(self, now: float) -> None:
        """Drops the buckets that are full again by ``now`` (a key not kept is full), so
        memory holds only keys in use."""
        for key in [k for k in self._state if self._at(k, now)[0] >= self.capacity]:
            del self._state[key]

    def __len__(self) -> int:
        return len(self._state)

    def __iter__(self) -> Iterator[str]:
        """The keys whose bucket is kept (drawn from and not forgotten)."""
        return iter(list(self._state))
