"""Moving batches through a type's pipeline from the gateway.

``PipelineRunner`` walks a type's stage list, calling the deployment that hosts each run
of consecutive stages once per batch (stages hosted by the gateway itself, like ``ack``,
run in-process). ``TypeBatcher`` is a gateway's bounded inbound buffer for one type: it
groups what arrived within ``batch_wait_ms`` and hands batches to the runner one at a
time, so a connection's messages keep their order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.exceptions import BackPressureError

from stages.model import Envelope, Outcome
from stages.pipeline import Pipeline
from stages.resolver import Resolver, StageRegistry, TypeSpec

log = logging.getLogger("conveyor.gateway")
LOCAL = "gateway"


@dataclass
class RunProgress:
    """How far one batch got: every item's latest outcome and the next segment to run."""

    outcomes: list[Outcome]
    next_segment: int = 0

    @classmethod
    def start(cls, batch: Sequence[Envelope]) -> RunProgress:
        return cls([Outcome.ok(e) for e in batch])


class SegmentFailed(Exception):
    """A segment of a run failed or was refused by the host serving it."""

    def __init__(self, host: str, stages: Sequence[str], cause: BaseException) -> None:
        super().__init__(f"{host} failed {'/'.join(stages)}: {cause!r}")
        self.host = host
        self.stages = list(stages)
        self.cause = cause

    @property
    def refused(self) -> bool:
        """The host's queue was full (Serve's ``max_queued_requests``): nothing ran."""
        return isinstance(self.cause, BackPressureError)


def blame(exc: BaseException) -> tuple[str, str]:
    """(host, reason) for a failed run, for logs and ``conveyor_dropped_total``."""
    if isinstance(exc, SegmentFailed):
        return exc.host, "stage_refused" if exc.refused else "stage_failed"
    return LOCAL, "stage_refused" if isinstance(exc, BackPressureError) else "stage_failed"


class PipelineRunner:
    def __init__(
        self,
        resolver: Resolver,
        registry: StageRegistry,
        hosts: Mapping[str, str],
        handles: Mapping[str, Any],
        local_ports: Mapping[str, Any],
        observer: Callable[[str, float, int], None] | None = None,
        call_timeout_s: float = 30.0,
    ) -> None:
        self.observer = observer
        self.call_timeout_s = call_timeout_s
        self.resolver = resolver
        self.registry = registry
        self.hosts = hosts
        self.handles = handles
        self.local_ports = local_ports
        self._local: dict[tuple[str, int, int, int], Pipeline] = {}

    def host_of(self, stage: str) -> str:
        return self.hosts.get(stage, LOCAL)

    def segments(self, spec: TypeSpec, route: int) -> list[tuple[str, int, int]]:
        """(host, start, stop) runs of consecutive stages served by the same host.

        Remote runs are merged (one call per host per batch); stages run in the gateway
        stay one per segment, so a failure right after ``ack`` does not ack again."""
        out: list[tuple[str, int, int]] = []
        for i, stage in enumerate(spec.stages_for(route)):
            host = self.host_of(stage.name)
            if out and out[-1][0] == host and host != LOCAL:
                out[-1] = (host, out[-1][1], i + 1)
            else:
                out.append((host, i, i + 1))
        return out

    async def run(self, type_name: str, route: int, batch: Sequence[Envelope],
                  progress: RunProgress | None = None) -> list[Outcome]:
        """Run a batch through its pipeline, from ``progress`` on when given (a retry).

        Raises ``SegmentFailed`` when a segment fails; ``progress`` then holds the outcomes
        of every segment that completed, and the same progress resumes the run."""
        spec = self.resolver.spec(type_name)
        if progress is None:
            progress = RunProgress.start(batch)
        segments = self.segments(spec, route)
        stages = spec.stages_for(route)
        while progress.next_segment < len(segments):
            host, start, stop = segments[progress.next_segment]
            live = [i for i, o in enumerate(progress.outcomes) if not o.settled]
            if not live:
                break
            items = [progress.outcomes[i].envelope for i in live]
            try:
                if host == LOCAL:
                    results = await self._local_pipeline(type_name, route, start, stop).run(items)
                else:
                    results = await asyncio.wait_for(
                        self.handles[host].run.remote(type_name, route, start, stop, items),
                        self.call_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise SegmentFailed(host, [s.name for s in stages[start:stop]], exc) from exc
            for i, r in zip(live, results, strict=True):
                progress.outcomes[i] = r
            progress.next_segment += 1
        return list(progress.outcomes)

    def _local_pipeline(self, type_name: str, route: int, start: int, stop: int) -> Pipeline:
        key = (type_name, route, start, stop)
        pipe = self._local.get(key)
        if pipe is None:
            specs = self.resolver.spec(type_name).stages_for(route)[start:stop]
            pipe = self._local[key] = Pipeline(
                [self.registry.build(s, self.local_ports) for s in specs], observer=self.observer
            )
        return pipe


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
    ) -> None:
        self.on_retry = on_retry
        self.on_batch = on_batch
        self.spec = spec
        self.runner = runner
        self.on_outcomes = on_outcomes
        self.on_drop = on_drop
        self.queue: asyncio.Queue[Envelope] = asyncio.Queue(capacity)
        self.wait_s = wait_ms / 1000.0
        self.max_batch = max_batch
        self.batches = 0
        self.items = 0
        self.retries = 0
        self.last_latency_s = 0.0
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
            if self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
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
            t0 = time.monotonic()
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
            self.last_latency_s = time.monotonic() - t0
            self.batches += 1
            self.items += len(batch)
            await self.on_outcomes(outcomes)
            return
