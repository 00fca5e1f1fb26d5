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
from typing import Any

from ray.serve.exceptions import BackPressureError

from stages.model import Envelope, Outcome
from stages.pipeline import Pipeline
from stages.resolver import Resolver, StageRegistry, TypeSpec

log = logging.getLogger("conveyor.gateway")
LOCAL = "gateway"


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
        """(host, start, stop) runs of consecutive stages served by the same host."""
        out: list[tuple[str, int, int]] = []
        for i, stage in enumerate(spec.stages_for(route)):
            host = self.host_of(stage.name)
            if out and out[-1][0] == host:
                out[-1] = (host, out[-1][1], i + 1)
            else:
                out.append((host, i, i + 1))
        return out

    async def run(self, type_name: str, route: int, batch: Sequence[Envelope]) -> list[Outcome]:
        spec = self.resolver.spec(type_name)
        outcomes = [Outcome.ok(e) for e in batch]
        for host, start, stop in self.segments(spec, route):
            live = [i for i, o in enumerate(outcomes) if not o.settled]
            if not live:
                break
            items = [outcomes[i].envelope for i in live]
            if host == LOCAL:
                results = await self._local_pipeline(type_name, route, start, stop).run(items)
            else:
                results = await asyncio.wait_for(
                    self.handles[host].run.remote(type_name, route, start, stop, items),
                    self.call_timeout_s)
            for i, r in zip(live, results, strict=True):
                outcomes[i] = r
        return outcomes

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
        on_drop: Callable[[Envelope, str], None],
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
        delay = 0.05
        while True:
            t0 = time.monotonic()
            try:
                outcomes = await self.runner.run(self.spec.name, route, batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self.spec.durable:
                    for env in batch:
                        self.on_drop(env, "stage_refused" if isinstance(exc, BackPressureError)
                                     else "stage_failed")
                    log.warning("%s batch of %d dropped: %r", self.spec.name, len(batch), exc)
                    return
                # Durable: never dropped. Retry with backoff; the bounded buffer fills
                # meanwhile and the gateway stops reading sockets (backpressure).
                self.retries += 1
                if self.on_retry is not None:
                    self.on_retry(self.spec.name)
                log.warning("%s batch of %d failed (%r); retrying in %.2fs",
                            self.spec.name, len(batch), exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.last_latency_s = time.monotonic() - t0
            self.batches += 1
            self.items += len(batch)
            await self.on_outcomes(outcomes)
            return

