"""Kafka ingress records as pipeline work, and when the ingress should stop reading.

What each ``conveyor.ingress`` record becomes (PROTOCOL.md, "Kafka"):
- ``system``: one ``system`` frame to the live connections of the users in ``to``
  (at-most-once like every hub delivery; a repeat within the dedup window is skipped);
- ``chat``: an envelope of the ``chat`` pipeline from ``senderId`` (who must be a member),
  its dedup key the record's ``id``, as a client's frame id (the store dedupes by
  (senderId, id)); it costs no credits: the ingress is paced by the pipeline instead;
- ``notification``: an envelope of the ``notification`` pipeline as if ``subject`` had
  posted the item, with an id derived from (subject, record id), so a record read again
  is recognised as the notification already stored.

``IngressPace`` is the feedback loop's verdict for the consumer: it pauses the partitions
while the pipeline is saturated — a batch refused, a hand-off slower than
``pause_latency_s``, the hub's mailboxes past the pacer's saturation mark — and resumes
them by itself once the pacer's interval has passed without new pressure (the interval
doubles while pressure persists and halves when batches go through quickly).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from stages.bus import IngressRecord
from stages.feedback import Pacer
from stages.model import Envelope
from stages.ports import Delivery

# Namespace of the ids of notifications that came in through Kafka.
NOTIFICATION_IDS = uuid.UUID("6f1d2a52-3c1e-4f0e-9a43-0c6b7e1d2f10")


def notification_id(subject: str, record_id: str) -> str:
    return str(uuid.uuid5(NOTIFICATION_IDS, f"{subject}\x00{record_id}"))


def system_delivery(record: IngressRecord) -> Delivery:
    f = record.fields
    return Delivery(list(f["to"]), {"type": "system", "event": f["event"], "data": f["data"]})


def dedup_key(record: IngressRecord) -> str:
    return f"ingress:{record.type}:{record.id}"


def chat_envelope(record: IngressRecord) -> Envelope:
    f = record.fields
    return Envelope(type="chat", id=record.id, sender=f["senderId"],
                    fields={"chatId": f["chatId"], "body": f["body"]},
                    meta={"cost": 0, "source": "kafka"})


def notification_envelope(record: IngressRecord) -> Envelope:
    """The record's item as posted (the pipeline validates and normalises it again)."""
    subject = str(record.fields["subject"])
    item: Any = record.fields["item"]
    if record.raw is not None:
        doc = orjson.loads(record.raw)
        item = {k: v for k, v in doc.items() if k not in ("type", "id", "subject")}
    return Envelope(type="notification", id=f"kafka:{record.id}", sender=subject,
                    fields={"notification": item},
                    meta={"subject": {"id": subject},
                          "notificationId": notification_id(subject, record.id)})


class IngressPace:
    def __init__(self, pacer: Pacer, pause_latency_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pacer = pacer
        self.pause_latency_s = pause_latency_s
        self.clock = clock
        self.hold_until = 0.0
        self.last_reason = ""

    def observe(self, *, latency_s: float, backlog: int, refused: bool = False) -> None:
        """One batch's hand-off: how long it took, the downstream backlog, a refusal."""
        self.pacer.observe(latency_s=latency_s, backlog=backlog, refused=refused)
        reason = ("refused" if refused else
                  "slow" if latency_s > self.pause_latency_s else
                  "backlog" if self.pacer.paused else "")
        if reason:
            self.last_reason = reason
            self.hold_until = self.clock() + self.pacer.interval_s

    def saturated(self, backlog: int) -> bool:
        """Whether to keep the partitions paused now."""
        if backlog >= self.pacer.config.saturated_backlog:
            self.last_reason = "backlog"
            return True
        return self.clock() < self.hold_until

    @property
    def batch(self) -> int:
        return self.pacer.batch
