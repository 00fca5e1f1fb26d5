"""The event relay: moves the events outbox to the broker.

Loop: claim a batch (leased), publish it, and only after the broker acknowledged every
record mark it published. While the broker is down the batch is released with a delay
that doubles up to ``backoff_max_s`` (with jitter), so retries neither spin nor let a
later event of a key overtake an earlier one; chat delivery never waits for any of this.

Guarantees: every appended event is published at least once (a crash between the ack and
``mark_published`` republishes it after the lease, with the same ``eventId``); one key's
events are published in the order they were appended; nothing is published before its
transaction committed (the outbox only holds committed rows).

``status()`` is what a metric and ``/health/ready`` report: ``ok`` (last attempt
published or there was nothing to do), ``degraded`` (publishing or claiming is failing:
events wait in the outbox), with the pending count and the oldest event's age.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from adapters.event_outbox import EventOutbox
from stages.bus import EventPublisher

log = logging.getLogger("conveyor.kafka.relay")


class RelayState(StrEnum):
    STARTING = "starting"
    OK = "ok"
    DEGRADED = "degraded"


@dataclass
class RelayStatus:
    state: RelayState = RelayState.STARTING
    since: float = 0.0  # wall clock of the last state change
    last_error: str | None = None
    failures: int = 0  # consecutive failed attempts
    published_total: int = 0
    last_published_at: float | None = None
    pending: int = 0
    oldest_age_s: float = 0.0

    def detail(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.state.value, "pending": self.pending,
                               "oldestAgeS": round(self.oldest_age_s, 3),
                               "publishedTotal": self.published_total}
        if self.last_error:
            out["error"] = self.last_error
        return out


class EventRelay:
    def __init__(self, outbox: EventOutbox, publisher: EventPublisher, *, batch: int = 500,
                 lease_s: float = 60.0, idle_s: float = 0.2, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 30.0, rng: Callable[[], float] = random.random) -> None:
        self.outbox = outbox
        self.publisher = publisher
        self.batch = batch
        self.lease_s = lease_s
        self.idle_s = idle_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.rng = rng
        self._status = RelayStatus(since=time.time())
        self._stop = asyncio.Event()
        self._retry_in = 0.0

    # --- state ----------------------------------------------------------------------
    def _set(self, state: RelayState, error: str | None = None) -> None:
        if state is not self._status.state:
            log.log(logging.WARNING if state is RelayState.DEGRADED else logging.INFO,
                    "event relay %s%s", state.value, f": {error}" if error else "")
            self._status.state = state
            self._status.since = time.time()
        self._status.last_error = error
        self._status.failures = self._status.failures + 1 if state is RelayState.DEGRADED else 0

    def backoff_s(self) -> float:
        """Delay before the next attempt after ``failures`` failures in a row."""
        n = max(self._status.failures, 1)
        base = min(self.backoff_max_s, self.backoff_base_s * 2 ** (n - 1))
        return base * (0.5 + self.rng() / 2)

    async def status(self) -> RelayStatus:
        """The relay's state with fresh outbox figures (one cheap query)."""
        try:
            stats = await self.outbox.stats()
            self._status.pending, self._status.oldest_age_s = stats.pending, stats.oldest_age_s
        except Exception as e:  # the database is the store's health check, not ours
            log.debug("outbox stats: %r", e)
        return self._status

    @property
    def state(self) -> RelayState:
        return self._status.state

    # --- work -----------------------------------------------------------------------
    async def run_once(self) -> int:
        """Claim, publish, mark: one batch. Returns how many events were published; on a
        failure the batch is released for ``backoff_s()`` and 0 is returned."""
        try:
            claimed = await self.outbox.claim(self.batch, self.lease_s)
        except Exception as e:
            self._set(RelayState.DEGRADED, f"outbox: {e!r}")
            self._retry_in = self.backoff_s()
            return 0
        if not claimed:
            if self._status.state is RelayState.STARTING:
                self._set(RelayState.OK)
            return 0
        ids = [c.id for c in claimed]
        try:
            await self.publisher.publish([c.record for c in claimed])
        except Exception as e:  # PublishError, or anything else the client raised
            self._set(RelayState.DEGRADED, f"broker: {e}")
            self._retry_in = self.backoff_s()
            try:
                await self.outbox.release(ids, self._retry_in)
            except Exception as e2:  # the lease runs out by itself
                log.debug("release: %r", e2)
            return 0
        await self.outbox.mark_published(ids)
        self._status.published_total += len(ids)
        self._status.last_published_at = time.time()
        self._set(RelayState.OK)
        return len(ids)

    async def run(self) -> None:
        """Loop until ``stop()``: a full batch goes on at once, an empty one waits
        ``idle_s``, a failure waits the backoff."""
        self._stop.clear()
        while not self._stop.is_set():
            n = await self.run_once()
            if n >= self.batch:
                continue
            wait = self._retry_in if self._status.state is RelayState.DEGRADED else self.idle_s
            try:
                await asyncio.wait_for(self._stop.wait(), wait)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()
