"""Resilience of channels: a circuit breaker per channel and the retry policy."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from stages.notifications.ports import (
    Channel,
    Delivery,
    ResultCallback,
    SendResult,
    SendStatus,
    report_all,
)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failures`` transient failures in a row; after ``reset_s`` lets one
    trial batch through (half-open): a success closes it, a failure opens it again.
    Permanent failures (a bad address) say nothing about the channel and are ignored."""

    def __init__(self, failures: int = 5, reset_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = max(1, failures)
        self.reset_s = reset_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at >= self.reset_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def remaining_s(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when not open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.reset_s - (self.clock() - self.opened_at))

    def allow(self) -> bool:
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    def record(self, status: SendStatus) -> None:
        if status is SendStatus.DELIVERED:
            self.failures = 0
            self.opened_at = None
            self._trial = False
        elif status is SendStatus.TRANSIENT:
            self.failures += 1
            if self.opened_at is not None or self.failures >= self.threshold:
                self.opened_at = self.clock()
                self._trial = False


class GuardedChannel:
    """A channel behind a circuit breaker: ``available`` is False while it is open; a
    whole-batch exception counts as a transient failure of every item."""

    def __init__(self, inner: Channel, breaker: CircuitBreaker) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.breaker = breaker

    def available(self) -> bool:
        return self.inner.available() and self.breaker.state is not BreakerState.OPEN

    def retry_after_s(self) -> float:
        return self.breaker.remaining_s()

    async def send(self, deliveries: Sequence[Delivery],
                   on_result: ResultCallback | None = None) -> list[SendResult]:
        """The inner channel's ``send``; ``on_result`` is passed through, so each result is
        reported as the inner channel reports it. A batch refused by the breaker or whose
        ``send`` raised is reported here; a result the inner channel reported before it
        raised is kept (a delivery already made is not turned into a failure)."""
        if not deliveries:
            return []
        if not self.breaker.allow():
            refused = [SendResult(SendStatus.UNAVAILABLE, "circuit breaker open")] * len(deliveries)
            await report_all(refused, on_result)
            return refused
        known: dict[int, SendResult] = {}

        async def seen(i: int, result: SendResult) -> None:
            known[i] = result
            if on_result is not None:
                await on_result(i, result)

        try:
            results = await self.inner.send(deliveries, seen)
        except Exception as exc:
            failed = SendResult.transient(f"{type(exc).__name__}: {exc}"[:500])
            results = [known.get(i, failed) for i in range(len(deliveries))]
            await report_all(results, on_result, skip=frozenset(known))
        if len(results) != len(deliveries):
            raise RuntimeError(f"channel {self.kind} returned {len(results)} results "
                               f"for {len(deliveries)} deliveries")
        # One verdict per batch keeps the breaker's count meaningful: a batch of 100
        # timeouts is one failure of the channel, not 100.
        statuses = {r.status for r in results}
        if SendStatus.DELIVERED in statuses:
            self.breaker.record(SendStatus.DELIVERED)
        elif SendStatus.TRANSIENT in statuses:
            self.breaker.record(SendStatus.TRANSIENT)
        return results


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n (1-based) waits a random time in
    [d/2, d] where d = min(max_s, base_s * 2**(n-1)) ("equal jitter": never zero, and
    retries of a batch that failed together spread out)."""

    max_attempts: int = 5
    base_s: float = 1.0
    max_s: float = 60.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        d = min(self.max_s, self.base_s * float(2 ** max(0, attempt - 1)))
        return d / 2 + rng() * d / 2
