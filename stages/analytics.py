"""The monitoring/analytics stage: one event per accepted, delivered or read message."""

from __future__ import annotations

import time
from collections.abc import Sequence

from stages.model import Envelope, Outcome
from stages.ports import Analytics, AnalyticsEvent


class Track:
    """``event: accepted`` (after the ack) or ``event: receipt`` (on receipts; the gateway
    puts per-message latencies in ``meta.latencies``). Never rejects anything."""

    name = "track"

    def __init__(self, analytics: Analytics, event: str) -> None:
        if event not in ("accepted", "receipt"):
            raise ValueError("track: event must be 'accepted' or 'receipt'")
        self.analytics = analytics
        self.event = event

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        now = time.time()
        events: list[AnalyticsEvent] = []
        for env in batch:
            if self.event == "accepted":
                if not env.meta.get("duplicate") and "messageId" in env.meta:
                    events.append(AnalyticsEvent("accepted", env.meta["messageId"], env.sender,
                                                 env.type, now - env.received_at))
                continue
            status = env.fields.get("status", "delivered")
            latencies = env.meta.get("latencies", {})
            ids = env.fields.get("messageIds")
            for mid in ids if isinstance(ids, list) else []:
                if isinstance(mid, str):
                    events.append(AnalyticsEvent(
                        "read" if status == "read" else "delivered", mid, env.sender, "chat",
                        latencies.get(mid)))
        if events:
            self.analytics.emit(events)
        return [Outcome.ok(e) for e in batch]
