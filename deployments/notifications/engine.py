"""``DispatchEngine``: the dispatcher's outbox loops, independent of Ray (tests run them
directly): immediate notifications at once, queued ones flushed in batches, retries with
backoff and jitter, every attempt recorded, final state stored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson

from cluster.telemetry import Recorder
from stages.notifications import (
    Channel,
    DispatchPacer,
    DispatchQueue,
    Job,
    RetryPolicy,
    RoundReport,
    RoundResult,
    SendStatus,
    dispatch_round,
)

log = logging.getLogger("conveyor.notifications")


class DispatchEngine:
    """The outbox loops, independent of Ray (tests run them directly).

    Two loops: *urgent* (kicked ids, immediate notifications whose kick was lost, due
    retries) wakes on a kick or every ``tick_s``; *flush* sends queued notifications every
    ``flush_interval_s``. Each loop is paced by its own ``DispatchPacer`` (the feedback
    loop): slow or failing rounds shrink its batch and lengthen its interval, every channel
    down pauses it, and it recovers by itself. The flush loop also purges expired
    idempotency keys every ``purge_interval_s``.
    """

    def __init__(self, store: DispatchQueue, channels: Mapping[str, Channel],
                 policy: RetryPolicy, *, batch_size: int = 100, flush_interval_s: float = 5.0,
                 lease_s: float = 300.0, tick_s: float = 1.0, recorder: Recorder | None = None,
                 round_target_s: float = 10.0, purge_interval_s: float = 300.0) -> None:
        self.store = store
        self.channels = channels
        self.policy = policy
        self.batch_size = max(1, batch_size)
        self.flush_interval_s = flush_interval_s
        self.lease_s = lease_s
        self.tick_s = min(tick_s, flush_interval_s)
        self.recorder = recorder or Recorder()
        self.urgent_pace = DispatchPacer(self.batch_size, self.tick_s, target_latency_s=round_target_s)
        self.flush_pace = DispatchPacer(self.batch_size, flush_interval_s,
                                        target_latency_s=round_target_s)
        self.purge_interval_s = purge_interval_s
        self._purged_at: float | None = None
        self._wanted: list[str] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.rounds = 0
        self.finished = 0
        self.purged = 0

    def kick(self, ids: Sequence[str]) -> None:
        self._wanted.extend(ids)
        self._wake.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._tasks:
            self._tasks = [loop.create_task(self._urgent_loop()), loop.create_task(self._flush_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    def channels_down(self) -> bool:
        """Every configured channel is not working now (breakers open)."""
        return bool(self.channels) and not any(ch.available() for ch in self.channels.values())

    async def run_round(self, jobs: list[Job], pace: DispatchPacer | None = None) -> int:
        """One round over claimed ``jobs``: each delivered send is recorded as it completes
        (``store.record_delivered``), then every outcome with ``finish_round``. A process
        that dies mid-round leaves its deliveries recorded but those in flight; the jobs
        come back after their lease and repeat at most those. A round that fails gives its
        jobs back at once (``release``); deliveries it recorded stay recorded."""
        if not jobs:
            return 0
        t0 = time.perf_counter()
        try:
            results = await dispatch_round(jobs, self.channels, self.policy, journal=self.store)
            await self.store.finish_round(results)
        except Exception:
            log.exception("notification round of %d failed; releasing", len(jobs))
            with contextlib.suppress(Exception):
                await self.store.release([j.id for j in jobs])
            if pace is not None:
                pace.observe(RoundReport(time.perf_counter() - t0, error=True,
                                         channels_down=self.channels_down()))
            return 0
        took = time.perf_counter() - t0
        self.rounds += 1
        rec = self.recorder
        rec.observe("conveyor_notification_round_seconds", took)
        tried = failed = 0
        for r in results:
            for a in r.attempts:
                tried += 1
                failed += a.status in (SendStatus.TRANSIENT, SendStatus.UNAVAILABLE)
                rec.inc("conveyor_notification_attempts_total", channel=a.channel, status=a.status.value)
            if r.final is not None:
                self.finished += 1
                rec.inc("conveyor_notifications_final_total", state=r.final.value)
            else:
                rec.inc("conveyor_notification_retries_total")
            log_round_result(r)
        if pace is not None:
            pace.observe(RoundReport(took, tried, failed, self.channels_down()))
        return len(jobs)

    async def urgent_once(self) -> int:
        """Kicked ids, then due retries and immediate ones whose kick was lost, in batches
        of the pacer's size; stops early when the pacer is no longer at full pace."""
        pace = self.urgent_pace
        done = 0
        while self._wanted:
            n = pace.batch
            ids, self._wanted = self._wanted[:n], self._wanted[n:]
            done += await self.run_round(await self.store.claim_ids(ids, self.lease_s), pace)
        while True:
            n = pace.batch
            jobs = await self.store.claim_urgent(n, self.lease_s)
            done += await self.run_round(jobs, pace)
            if len(jobs) < n or pace.state != "normal":
                return done

    async def flush_once(self) -> int:
        """Queued notifications, in batches of the pacer's size until none is due (or the
        pacer slows down: the rest waits for the next flush)."""
        pace = self.flush_pace
        done = 0
        while True:
            n = pace.batch
            jobs = await self.store.claim_queued(n, self.lease_s)
            done += await self.run_round(jobs, pace)
            if len(jobs) < n or pace.state != "normal":
                return done

    async def purge_once(self) -> int:
        """Expired idempotency keys removed now."""
        removed = await self.store.purge_expired()
        self._purged_at = time.monotonic()
        self.purged += removed
        if removed:
            log.info("purged %d expired idempotency keys", removed)
        return removed

    async def _paced(self, pace: DispatchPacer, work: Callable[[], Awaitable[int]]) -> None:
        """One tick of a loop: pause while every channel is down, else run ``work``; an
        idle tick counts as a healthy round (the pace recovers when the work is done)."""
        if pace.paused and self.channels_down():
            pace.observe(RoundReport(0.0, channels_down=True))
            self._wanted.clear()  # immediate ones are claimed by the urgent loop anyway
            return
        try:
            if await work() == 0:
                pace.observe(RoundReport(0.0, channels_down=self.channels_down()))
        except Exception:
            log.exception("notification dispatch tick failed")
            pace.observe(RoundReport(0.0, error=True))

    async def _urgent_loop(self) -> None:
        pace = self.urgent_pace
        while True:
            t0 = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pace.interval_s)
            if pace.state != "normal":  # slowed down: a kick does not cut the interval short
                rest = pace.interval_s - (time.monotonic() - t0)
                if rest > 0:
                    await asyncio.sleep(rest)
            self._wake.clear()
            await self._paced(pace, self.urgent_once)

    async def _flush_loop(self) -> None:
        pace = self.flush_pace
        while True:
            if self._purged_at is None or time.monotonic() - self._purged_at >= self.purge_interval_s:
                try:
                    await self.purge_once()
                except Exception:
                    log.exception("purging expired idempotency keys failed")
                    self._purged_at = time.monotonic()
            await asyncio.sleep(pace.interval_s)
            await self._paced(pace, self.flush_once)

    def pace(self) -> dict[str, Any]:
        return {name: {"state": p.state, "batch": p.batch, "intervalS": p.interval_s}
                for name, p in (("urgent", self.urgent_pace), ("flush", self.flush_pace))}


def log_round_result(r: RoundResult) -> None:
    """One JSON line per dispatch attempt (and per outcome), the notification id as trace id."""
    for a in r.attempts:
        log.info(orjson.dumps({
            "event": "notification_attempt", "traceId": a.notification_id,
            "contact": a.contact_index, "channel": a.channel, "attempt": a.attempt,
            "status": a.status.value, "detail": a.detail, "durationMs": round(a.duration_s * 1000, 1),
        }).decode(), extra={"trace_id": a.notification_id})
    outcome: dict[str, Any] = {"event": "notification_round", "traceId": r.job.id,
                               "round": r.job.round}
    if r.final is not None:
        outcome["state"] = r.final.value
    else:
        outcome["retryInS"] = round(r.retry_in_s, 3)
    log.info(orjson.dumps(outcome).decode(), extra={"trace_id": r.job.id})
