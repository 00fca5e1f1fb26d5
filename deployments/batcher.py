"""``TypeBatcher``: a gateway's bounded inbound buffer for one message type.

It hands batches to the runner one at a time, so a connection's messages keep their
order. What arrives while a batch runs forms the next batch; a lone message after a quiet
spell goes at once, and under load the batcher waits ``batch_wait_ms`` for company.
Durable batches are retried from the segment that failed; droppable ones are dropped
(counted) when a stage refuses them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from deployments.pipeline_runner import PipelineRunner, RunProgress, blame
from stages.model import Envelope, Outcome
from stages.resolver import TypeSpec

log = logging.getLogger("conveyor.gateway")


class TypeBatcher:
    """Bounded inbound buffer + micro-batching for one message type on one gateway."""

    def __init__(
        self,
        spec: TypeSpec,
        runner: PipelineRunner,
        on_outcomes: Callable[[list[Outcome]], Awaitable[None]],
        *,
        capacity: int,
        wait_ms: float,
        max_batch: int,
        on_drop: Callable[[Envelope, str, str], None],
        on_retry: Callable[[str], None] | None = None,
        on_batch: Callable[[str, int], None] | None = None,
        on_hop: Callable[[str, float], None] | None = None,
    ) -> None:
        self.on_hop = on_hop  # ("queue", seconds the batch's oldest item waited)
        self.on_retry = on_retry
        self.on_batch = on_batch
        self.spec = spec
        self.runner = runner
        self.on_outcomes = on_outcomes
        self.on_drop = on_drop
        self.queue: asyncio.Queue[Envelope] = asyncio.Queue(capacity)
        self.wait_s = wait_ms / 1000.0
        self.max_batch = max_batch
        self.retries = 0
        self._loaded = False  # the last batch had more than one item
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    @property
    def capacity(self) -> int:
        return self.queue.maxsize

    @property
    def full(self) -> bool:
        return self.queue.full()

    def offer(self, env: Envelope) -> bool:
        """Non-blocking put; False when full."""
        try:
            self.queue.put_nowait(env)
            return True
        except asyncio.QueueFull:
            return False

    async def put(self, env: Envelope) -> None:
        """Blocking put: waits for room (the caller stops reading its socket meanwhile)."""
        await self.queue.put(env)

    async def _loop(self) -> None:
        while True:
            first = await self.queue.get()
            # Idle (the last batch was a lone item): flush at once, no fixed wait. Under
            # load (the last batch had company): wait a moment for more, so each call
            # carries a full batch (shipping only what is queued already makes more,
            # smaller calls, and the calls are what costs).
            if self.wait_s > 0 and self._loaded:
                await asyncio.sleep(self.wait_s)
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            self._loaded = len(batch) > 1
            if self.on_hop is not None:
                self.on_hop("queue", time.time() - min(e.received_at for e in batch))
            if not self.spec.variants:
                await self._process(-1, batch)
                continue
            routes: dict[int, list[Envelope]] = {}
            for env in batch:
                routes.setdefault(self.spec.route(env), []).append(env)
            for route, part in routes.items():
                await self._process(route, part)

    async def _process(self, route: int, batch: list[Envelope]) -> None:
        if self.on_batch is not None:
            self.on_batch(self.spec.name, len(batch))
        progress = RunProgress.start(batch)
        delay = 0.05
        while True:
            try:
                outcomes = await self.runner.run(self.spec.name, route, batch, progress)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                host, reason = blame(exc)
                if not self.spec.durable:
                    # Items a stage already settled (rejected, done) keep their outcome;
                    # only the ones still on their way are dropped.
                    settled = [o for o in progress.outcomes if o.settled]
                    live = [o.envelope for o in progress.outcomes if not o.settled]
                    for env in live:
                        self.on_drop(env, reason, host)
                    log.warning("%s batch: %d dropped (%s at %s): %r", self.spec.name,
                                len(live), reason, host, exc)
                    if settled:
                        await self.on_outcomes(settled)
                    return
                # Durable: never dropped. Retry with backoff from the segment that failed;
                # the bounded buffer fills meanwhile and the gateway stops reading sockets.
                self.retries += 1
                if self.on_retry is not None:
                    self.on_retry(self.spec.name)
                log.warning("%s batch of %d failed at segment %d (%r); retrying in %.2fs",
                            self.spec.name, len(batch), progress.next_segment, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            await self.on_outcomes(outcomes)
            return
