"""The event relay deployment: publishes the events outbox to the events topic.

Deployed only with ``kafka_bootstrap`` set. Thin: it runs ``EventRelay.run`` (claim,
publish with ``acks=all``, mark published; a full batch goes on at once, an idle one
waits ``event_relay_interval_s``, a broker that is down is retried with a doubling
backoff). Chat delivery never waits for it: events are appended in the stores'
transactions and wait in the outbox. ``status`` is what ``/health/ready`` shows (pending,
lag, state) and the ``conveyor_event_*`` metrics say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ray import serve

from cluster.telemetry import MetricsPusher, Recorder
from deployments.services import Wiring

log = logging.getLogger("conveyor.kafka.relay")


# Defaults equal serve_app/config.yaml's; the Serve config is where operators change them.
# Several replicas are safe (claims are leased, one key at a time), one is enough.
@serve.deployment(ray_actor_options={"num_cpus": 0.05}, num_replicas=1)
class EventRelay:
    async def __init__(self, wiring: Wiring) -> None:
        self.settings = wiring.settings
        self.relay = await wiring.open_events()
        self.detail: dict[str, Any] = {"status": "starting"}
        self.published_seen = 0
        self.metrics = MetricsPusher("event_relay", self.settings.metrics_push_s)
        self.metrics.refresh = self._gauges
        self.metrics.start()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self.relay.run())
        self._status_task = loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Fresh outbox figures for the metrics, every push interval."""
        while True:
            with contextlib.suppress(Exception):
                await self.status()
            await asyncio.sleep(self.settings.metrics_push_s)

    def _gauges(self, rec: Recorder) -> None:
        d = self.detail
        rec.set("conveyor_event_outbox_pending", d.get("pending", 0))
        rec.set("conveyor_event_outbox_lag_seconds", d.get("oldestAgeS", 0.0))
        rec.set("conveyor_event_relay_degraded", 1 if d.get("status") == "degraded" else 0)
        published = int(d.get("publishedTotal", 0))
        if published > self.published_seen:
            rec.inc("conveyor_events_published_total", published - self.published_seen)
            self.published_seen = published

    async def status(self) -> dict[str, Any]:
        """The relay's detail: ``status`` (starting, ok, degraded), ``pending``,
        ``oldestAgeS`` (the lag), ``publishedTotal``, ``error`` while degraded."""
        self.detail = (await self.relay.status()).detail()
        return self.detail

    async def health(self) -> dict[str, Any]:
        """What ``/health/ready`` shows for the relay."""
        return await self.status()

    async def ping(self) -> bool:
        return True

    async def check_health(self) -> None:
        if self._task.done():  # the loop ended: let Serve replace the replica
            raise RuntimeError(f"event relay loop ended: {self._task!r}")

    async def __del__(self) -> None:
        self.relay.stop()
        self._status_task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 5.0)
