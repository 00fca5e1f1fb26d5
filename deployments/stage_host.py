"""A Serve deployment that hosts one or more pipeline stages.

The gateway calls ``run`` with a *batch* and the slice of a type's stage list this host
should execute; the host runs those stages (domain code from ``stages/``) with its ports.
Which stages a host serves, and how many replicas it has, comes from the Serve config.
"""

from __future__ import annotations

from ray import serve

from cluster.telemetry import MetricsAnalytics, MetricsOutages, MetricsPusher
from deployments.services import Wiring
from stages.model import Envelope, Outcome
from stages.pipeline import Pipeline


# Bounded by default: a caller (gateway replica) queues at most max_queued_requests calls
# for this host; beyond that Serve refuses with BackPressureError, which the gateway turns
# into a retry (durable) or a counted drop (droppable). The Serve config may change both.
# Defaults equal serve_app/config.yaml's; the Serve config is where operators change them.
@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=16,
                  max_queued_requests=256)
class StageHost:
    async def __init__(self, wiring: Wiring, stages: list[str]) -> None:
        self.stage_names = set(stages)
        self.services = await wiring.open_chat()
        self._pipelines: dict[tuple[str, int, int, int], Pipeline] = {}
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            replica = "local"
        self.metrics = MetricsPusher(f"stages:{replica}", self.services.settings.metrics_push_s)
        self.metrics.start()

    def _pipeline(self, type_name: str, route: int, start: int, stop: int) -> Pipeline:
        key = (type_name, route, start, stop)
        pipe = self._pipelines.get(key)
        if pipe is None:
            specs = self.services.resolver.spec(type_name).stages_for(route)[start:stop]
            foreign = [s.name for s in specs if s.name not in self.stage_names]
            if foreign:
                raise ValueError(f"this host does not serve stages {foreign}")
            recorder = self.metrics.recorder
            ports = self.services.ports.with_(analytics=MetricsAnalytics(recorder),
                                              outages=MetricsOutages(recorder))
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
        await self.services.chats.ping()
        return True

    async def check_health(self) -> None:
        await self.services.chats.ping()
