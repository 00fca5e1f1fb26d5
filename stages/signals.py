"""The signal route: never stored. validate → dedup window → ack → forward."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import orjson

from stages.model import Envelope, Outcome
from stages.ports import DedupWindow, Delivery, DeliveryHub, Outages

log = logging.getLogger("conveyor.signals")
MAX_USER_ID = 128


class ValidateSignal:
    """Minimal validation: a recipient user id and an object payload under a size cap."""

    name = "validate_signal"

    def __init__(self, max_payload_bytes: int = 16_384) -> None:
        self.max_payload_bytes = max_payload_bytes

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        out = []
        for env in batch:
            to = env.fields.get("to")
            payload = env.fields.get("payload")
            if not isinstance(to, str) or not 0 < len(to) <= MAX_USER_ID:
                out.append(Outcome.reject(env, "invalid", "'to' must be a user id"))
            elif not isinstance(payload, dict):
                out.append(Outcome.reject(env, "invalid", "'payload' must be an object"))
            elif len(orjson.dumps(payload)) > self.max_payload_bytes:
                out.append(Outcome.reject(env, "invalid",
                                          f"'payload' exceeds {self.max_payload_bytes} bytes"))
            else:
                out.append(Outcome.ok(env))
        return out


class DedupSignal:
    """Marks a repeated (sender, id) within the window as a duplicate: acked, not forwarded.

    If the window (or a shard of it) cannot be reached, its signals count as first seen
    and are reported to ``outages``, as the credits stage does with the bank: a resent
    signal may then be forwarded twice, but losing the window never drops a signal."""

    name = "dedup_signal"

    def __init__(self, window: DedupWindow, outages: Outages | None = None) -> None:
        self.window = window
        self.outages = outages

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        answers: list[bool | None]
        try:
            answers = list(await self.window.first_seen([f"{e.sender}\x1f{e.id}" for e in batch]))
        except Exception as exc:
            log.warning("dedup window unreachable (%r): %d signals pass unchecked",
                        exc, len(batch))
            answers = [None] * len(batch)
        unchecked = sum(1 for a in answers if a is None)
        if unchecked and self.outages is not None:
            self.outages.unavailable("dedup", self.name, unchecked)
        for env, new in zip(batch, answers, strict=True):
            env.meta["duplicate"] = new is False
        return [Outcome.ok(e) for e in batch]


class ForwardSignal:
    """Hands signals to the hub for the recipient's live connections (at-most-once)."""

    name = "forward_signal"

    def __init__(self, hub: DeliveryHub) -> None:
        self.hub = hub

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        deliveries = [
            Delivery([e.fields["to"]], {"type": "signal", "id": e.id, "from": e.sender,
                                        "payload": e.fields["payload"]})
            for e in batch if not e.meta.get("duplicate")
        ]
        if deliveries:
            await self.hub.publish(deliveries)
        return [Outcome.done(e) for e in batch]
