"""The outbox relay: delivers what the fast path left behind.

The delivery stage removes a batch's outbox entries once it has handed the messages to
the hub. Entries still there after ``outbox_grace_s`` belong to a batch whose delivery
never ran (a replica died between commit and hand-off): the relay leases them, publishes
their messages to the members' live connections, and removes them. Its pace follows the
feedback loop (``stages/feedback.py``): it slows down and pauses when the hub's mailboxes
back up or publishing is slow, and speeds up again by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from cluster.telemetry import MetricsPusher
from deployments.services import Wiring
from stages.attachments import ready_key
from stages.feedback import PaceConfig, Pacer
from stages.ports import Delivery

log = logging.getLogger("conveyor.relay")


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, num_replicas=1)
class OutboxRelay:
    async def __init__(self, wiring: Wiring) -> None:
        self.services = await wiring.open_chat()
        self.settings = self.services.settings
        self.pacer = Pacer(PaceConfig(
            min_interval_s=self.settings.relay_interval_s,
            max_interval_s=max(self.settings.relay_interval_s * 20, 5.0),
            max_batch=self.settings.relay_batch,
        ))
        self.relayed = 0
        self.rounds = 0
        self.metrics = MetricsPusher("relay", self.settings.metrics_push_s)
        self.metrics.refresh = lambda r: r.set("conveyor_relay_batch", self.pacer.batch)
        self.metrics.start()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.pacer.interval_s)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("relay round failed")
                self.pacer.observe(latency_s=0.0, backlog=0, refused=True)

    async def round(self) -> int:
        """One lease-publish-remove round; returns how many messages were relayed."""
        self.rounds += 1
        backlog = sum(s["mailbox_depth"] for s in await self.services.hub.stats())
        if self.pacer.paused and backlog >= self.pacer.config.saturated_backlog:
            self.pacer.observe(latency_s=0.0, backlog=backlog)
            return 0
        claimed = await self.services.outbox.claim(self.settings.outbox_grace_s,
                                                         self.pacer.batch)
        t0 = time.monotonic()
        count = 0
        if claimed:
            chats = sorted({m.chat_id for _, msgs in claimed for m in msgs})
            members = await self.services.directory.members(chats)
            deliveries = [
                Delivery(sorted(members.get(m.chat_id, ())), m.frame())
                for _, msgs in claimed for m in msgs
            ]
            await self.services.hub.publish(deliveries)
            await self.services.outbox.done([oid for oid, _ in claimed])
            count = len(deliveries)
            self.relayed += count
            log.info("relayed %d messages from %d outbox entries", count, len(claimed))
        self.pacer.observe(latency_s=time.monotonic() - t0, backlog=backlog)
        if self.rounds % 30 == 1:
            await self.expire_attachments()
        return count

    async def expire_attachments(self) -> int:
        """Attachments never uploaded (pending ``attachment_expiry_grace_s`` past their
        expiry; one being checked is left alone): mark expired, remove any bytes. Then the
        bytes of attachments whose message was deleted. Returns how many were handled."""
        s = self.settings
        expired = await self.services.attachments.expire(s.attachment_expiry_grace_s,
                                                         s.attachment_claim_lease_s)
        deleted = await self.services.attachments.deleted()
        for rec in [*expired, *deleted]:
            await self.services.objects.delete(rec.object_key)
            await self.services.objects.delete(ready_key(rec))
        if deleted:
            await self.services.attachments.removed([r.id for r in deleted])
        if expired or deleted:
            log.info("expired %d attachments never uploaded; removed the files of %d deleted"
                     " ones", len(expired), len(deleted))
        return len(expired) + len(deleted)

    async def stats(self) -> dict[str, Any]:
        pending, age = await self.services.outbox.stats()
        return {"relayed": self.relayed, "rounds": self.rounds, "pending": pending,
                "oldestAgeS": age, "pace": self.pacer.state, "batch": self.pacer.batch,
                "intervalS": self.pacer.interval_s}

    async def ping(self) -> bool:
        await self.services.chats.ping()
        return True
