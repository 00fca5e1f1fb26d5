"""``NotificationDispatcher``: the Serve deployment that runs the ``DispatchEngine``.

A dead process loses nothing: its leases expire and the outbox rows are claimed again.
Several replicas may run: claims are leased, and the Bitrix24 portal's rate limit is
held across them (and the gateways' readiness pings) by one shared gate.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from cluster.telemetry import MetricsPusher
from deployments.notifications.engine import DispatchEngine
from deployments.services import Wiring
from stages.notifications import RetryPolicy

log = logging.getLogger("conveyor.notifications")


# Defaults equal serve_app/config.yaml's; the Serve config is where operators change them.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, num_replicas=1, max_ongoing_requests=100)
class NotificationDispatcher:
    async def __init__(self, wiring: Wiring) -> None:
        self.services = svc = await wiring.open_notifications()
        s = svc.settings
        self.engine = DispatchEngine(
            svc.queue, svc.channels,
            RetryPolicy(s.notification_max_attempts, s.notification_retry_base_s,
                        s.notification_retry_max_s),
            batch_size=s.notification_batch_size, flush_interval_s=s.notification_flush_interval_s,
            lease_s=s.notification_lease_s, round_target_s=s.notification_round_target_s,
            purge_interval_s=s.idempotency_purge_interval_s)
        self.metrics = MetricsPusher("notifications", s.metrics_push_s)
        self.metrics.recorder = self.engine.recorder
        self.metrics.start()
        self.engine.start()

    async def dispatch_now(self, ids: list[str]) -> int:
        """Hand-off of immediate notifications: queued for the engine, returns at once."""
        self.engine.kick(ids)
        return len(ids)

    async def ping(self) -> bool:
        await self.services.store.ping()
        return True

    async def stats(self) -> dict[str, Any]:
        return {"rounds": self.engine.rounds, "finished": self.engine.finished,
                "pace": self.engine.pace(), **await self.services.queue.stats()}

    async def check_health(self) -> None:
        await self.ping()
