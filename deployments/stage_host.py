"""A Serve deployment that hosts one or more pipeline stages.

The gateway calls ``run`` with a *batch* and the slice of a type's stage list this host
should execute; the host runs those stages (domain code from ``stages/``) with its ports.
Which stages a host serves, and how many replicas it has, comes from the Serve config.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from cluster.telemetry import MetricsAnalytics, MetricsPusher
from serve_app.bootstrap import open_services
from settings import Settings
from stages.model import Envelope, Outcome
from stages.pipeline import Pipeline


# Bounded by default: a caller (gateway replica) queues at most max_queued_requests calls
# for this host; beyond that Serve refuses with BackPressureError, which the gateway turns
# into a retry (durable) or a counted drop (droppable). The Serve config may change both.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16,
                  max_queued_requests=256)
class StageHost:
    async def __init__(self, settings: dict[str, Any], stages: list[str]) -> None:
        self.settings = Settings(**settings)
        self.stage_names = set(stages)
        self.services = await open_services(self.settings)
        self._pipelines: dict[tuple[str, int, int, int], Pipeline] = {}
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            replica = "local"
        self.metrics = MetricsPusher(f"stages:{replica}", self.settings.metrics_push_s)
        self.metrics.start()

    def _pipeline(self, type_name: str, route: int, start: int, stop: int) -> Pipeline:
        key = (type_name, route, start, stop)
        pipe = self._pipelines.get(key)
        if pipe is None:
            specs = self.services.resolver.spec(type_name).stages_for(route)[start:stop]
            foreign = [s.name for s in specs if s.name not in self.stage_names]
            if foreign:
                raise ValueError(f"this host does not serve stages {foreign}")
            ports = self.services.ports(analytics=MetricsAnalytics(self.metrics.recorder))
            pipe = self._pipelines[key] = Pipeline(
                [self.services.registry.build(s, ports) for s in specs],
                observer=self.metrics.observe_stage,
            )
        return pipe

    async def run(
        self, type_name: str, route: int, start: int, stop: int, batch: list[Envelope]
    ) -> list[Outcome]:
        return await self._pipeline(type_name, route, start, stop).run(batch)

    async def ping(self) -> bool:
        await self.services.store.ping()
        return True

    async def check_health(self) -> None:
        await self.services.store.ping()
