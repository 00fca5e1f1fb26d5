"""Monitoring and analytics events."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class AnalyticsEvent:
    kind: str  # accepted | delivered | read
    message_id: str
    user_id: str  # the sender (accepted) or the receiver (delivered, read)
    type: str  # message type
    latency_s: float | None  # accepted: since the gateway received it; else since stored


class Analytics(Protocol):
    """Monitoring and analytics events. Fire-and-forget, at-most-once: an adapter may
    sample, aggregate or lose events, and must never slow the pipeline down."""

    def emit(self, events: Sequence[AnalyticsEvent]) -> None: ...



class Outages(Protocol):
    """Where stages report a dependency they could not reach and what they did instead
    (let ``items`` pass unchecked: credits, dedup). Fire-and-forget, never raises; the
    embedded adapter turns reports into ``conveyor_unavailable_total``."""

    def unavailable(self, dependency: str, stage: str, items: int) -> None: ...
