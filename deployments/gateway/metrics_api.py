"""``GET /metrics``: every process's counters (through the telemetry actor) plus the
gauges read at scrape time from the hub and the store, in Prometheus text format."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from cluster.telemetry import MetricsPusher, labels
from stages.ports import ChatStore, ConnectionRegistry, Outbox

log = logging.getLogger("conveyor.gateway")


class MetricsApi:
    def __init__(self, pusher: MetricsPusher, hub: ConnectionRegistry, outbox: Outbox,
                 chats: ChatStore) -> None:
        self.pusher = pusher
        self.hub = hub
        self.outbox = outbox
        self.chats = chats

    def routes(self) -> list[BaseRoute]:
        return [Route("/metrics", self.metrics_endpoint, methods=["GET"])]

    async def metrics_endpoint(self, request: Request) -> Response:
        """Prometheus text: every process's counters plus gauges read now."""
        live: dict[Any, float] = {}
        try:
            hubs = await asyncio.wait_for(self.hub.stats(), 5.0)
            live[("conveyor_users_online", ())] = sum(h["users_online"] for h in hubs)
            live[("conveyor_hub_mailbox_depth", ())] = sum(h["mailbox_depth"] for h in hubs)
            # Frames a hub shed from a full mailbox: counted in the hub, read now (a hub
            # restart resets them, which Prometheus reads as a counter reset).
            shed: dict[str, float] = {}
            for h in hubs:
                for frame_type, n in h.get("shed_by_type", {}).items():
                    shed[frame_type] = shed.get(frame_type, 0) + n
            for frame_type, n in shed.items():
                live[("conveyor_dropped_total", labels(type=frame_type, stage="hub",
                                                       reason="mailbox_full"))] = n
        except Exception as exc:
            log.warning("metrics: hub stats unavailable: %r", exc)
        try:
            pending, age = await asyncio.wait_for(self.outbox.stats(), 5.0)
            live[("conveyor_outbox_pending", ())] = pending
            live[("conveyor_outbox_lag_seconds", ())] = age
        except Exception as exc:
            log.warning("metrics: outbox stats unavailable: %r", exc)
        try:
            backlog, oldest = await asyncio.wait_for(self.chats.delivery_backlog(), 5.0)
            live[("conveyor_deliveries_pending", ())] = backlog
            live[("conveyor_delivery_lag_seconds", ())] = oldest
        except Exception as exc:
            log.warning("metrics: delivery backlog unavailable: %r", exc)
        text = await self.pusher.scrape(live)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")
