"""``PipelineRunner``: moves one batch through its type's pipeline.

It walks a type's stage list, calling the deployment that hosts each run of consecutive
stages once per batch (stages hosted by the calling process itself, like ``ack`` in the
gateway, run in-process), and can resume a failed run at the segment that failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
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
        on_hop: Callable[[str, float], None] | None = None,
    ) -> None:
        self.observer = observer
        self.call_timeout_s = call_timeout_s
        self.on_hop = on_hop  # (hop, seconds): the wall time of each call to a stage host
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
                    t0 = time.perf_counter()
                    results = await asyncio.wait_for(
                        self.handles[host].run.remote(type_name, route, start, stop, items),
                        self.call_timeout_s)
                    if self.on_hop is not None:
                        self.on_hop(f"call:{host}", time.perf_counter() - t0)
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
