"""The Kafka ingress deployment: ``conveyor.ingress`` records into the pipelines.

Deployed only with ``kafka_bootstrap`` set; its replicas share the topic's partitions in
one consumer group. Thin: ``IngressConsumer`` reads, dead-letters what does not parse and
commits only what was accepted; ``stages.ingress`` says what a record becomes and when to
pause; the pipelines run through the gateway's ``PipelineRunner`` (stage hosts by
handle, the notification pipeline in-process as in the gateway). A record a pipeline
rejects (not a member, no such chat, an invalid item) is dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ray import serve

from cluster.telemetry import MetricsAnalytics, MetricsOutages, MetricsPusher, Recorder
from deployments.pipeline_runner import PipelineRunner
from deployments.services import Wiring
from stages.bus import IngressRecord, Intake
from stages.feedback import PaceConfig, Pacer
from stages.ingress import (
    IngressPace,
    chat_envelope,
    dedup_key,
    notification_envelope,
    system_delivery,
)
from stages.model import Envelope, Verdict
from stages.ports import Delivery

log = logging.getLogger("conveyor.kafka.ingress")


class _Nobody:
    """Acks, notices and local sockets of a process that holds no client: a record's
    acceptance is its committed offset."""

    async def acknowledge(self, batch: Sequence[Any]) -> None:
        return None

    def notify(self, connection: str | None, event: str, data: Mapping[str, Any]) -> None:
        return None

    def deliver(self, deliveries: Sequence[Delivery]) -> None:
        return None


# Defaults equal serve_app/config.yaml's; the Serve config is where operators change them.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, num_replicas=1)
class KafkaIngress:
    async def __init__(self, wiring: Wiring, hosts: dict[str, str], handles: dict[str, Any],
                       notifier: Any = None) -> None:
        self.services = svc = await wiring.open_chat()
        s = self.settings = svc.settings
        try:
            replica = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:
            replica = "local"
        self.metrics = MetricsPusher(f"ingress:{replica}", s.metrics_push_s)
        self.metrics.refresh = self._gauges
        recorder = self.recorder = self.metrics.recorder
        notices = await wiring.open_notifications(notifier)
        nobody = _Nobody()
        ports = svc.ports.with_(acks=nobody, notices=nobody, local_delivery=nobody,
                                analytics=MetricsAnalytics(recorder),
                                outages=MetricsOutages(recorder),
                                notification_store=notices.store,
                                notification_dispatch=notices.kick)
        self.runner = PipelineRunner(svc.resolver, svc.registry, hosts, handles, local_ports=ports,
                                     observer=self.metrics.observe_stage,
                                     call_timeout_s=s.stage_call_timeout_s)
        backlog = s.kafka_ingress_pause_backlog
        self.pace = IngressPace(Pacer(PaceConfig(
            min_interval_s=0.5, max_interval_s=10.0, min_batch=10,
            max_batch=s.kafka_ingress_batch, step=max(s.kafka_ingress_batch // 10, 1),
            target_latency_s=s.kafka_ingress_pause_latency_s / 2,
            high_backlog=max(backlog // 4, 1), saturated_backlog=backlog)),
            s.kafka_ingress_pause_latency_s)
        self.dedup = svc.ports.dedup
        self.notifications = notices.store
        self._pauses_seen = 0
        self.started = False
        self.backlog = 0
        self._backlog_at = 0.0
        self.consumer = wiring.open_ingress(self.accept, self.saturated)
        self.metrics.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:  # the broker may be down when the replica starts: keep trying
            try:
                await self.consumer.start()
                self.started = True
                break
            except Exception as exc:
                log.warning("ingress consumer cannot start yet: %r", exc)
                with contextlib.suppress(Exception):
                    await self.consumer.stop()
                await asyncio.sleep(self.settings.kafka_ingress_retry_s)
        await self.consumer.run()

    # --- the feedback loop ----------------------------------------------------------
    async def _backlog(self) -> int:
        """Frames waiting in the hub's mailboxes (read at most once a second)."""
        now = time.monotonic()
        if now - self._backlog_at >= 1.0:
            self._backlog_at = now
            try:
                self.backlog = sum(h["mailbox_depth"] for h in await self.services.hub.stats())
            except Exception as exc:
                log.debug("hub stats: %r", exc)
        return self.backlog

    async def saturated(self) -> bool:
        """Asked before every poll: pause (or stay paused) while this is true."""
        self.consumer.max_batch = self.pace.batch
        return self.pace.saturated(await self._backlog())

    # --- one batch --------------------------------------------------------------------
    async def accept(self, records: list[IngressRecord]) -> Intake:
        t0 = time.monotonic()
        rejected: list[tuple[IngressRecord, str]] = []
        try:
            await asyncio.gather(
                self._system([r for r in records if r.type == "system"]),
                self._pipeline("chat", [(r, chat_envelope(r)) for r in records
                                        if r.type == "chat"], rejected),
                self._pipeline("notification", [(r, notification_envelope(r)) for r in records
                                                if r.type == "notification"], rejected))
        except Exception as exc:
            log.warning("ingress batch of %d refused (%r): read again after a pause",
                        len(records), exc)
            self.pace.observe(latency_s=time.monotonic() - t0, backlog=self.backlog,
                              refused=True)
            self._count(records, "refused")
            return Intake.REFUSED
        if rejected:
            await self.consumer.dead_letter_valid(rejected)
        self.pace.observe(latency_s=time.monotonic() - t0, backlog=await self._backlog())
        bad = {id(r) for r, _ in rejected}
        self._count([r for r in records if id(r) not in bad], "accepted")
        self._count([r for r, _ in rejected], "dead_lettered")
        return Intake.SATURATED if self.pace.saturated(self.backlog) else Intake.ACCEPTED

    async def _system(self, records: list[IngressRecord]) -> None:
        if not records:
            return
        fresh: list[bool | None] = [True] * len(records)
        if self.dedup is not None:
            fresh = await self.dedup.first_seen([dedup_key(r) for r in records])
        deliveries = [system_delivery(r) for r, f in zip(records, fresh, strict=True)
                      if f is not False]
        if deliveries:
            await self.services.hub.publish(deliveries)

    async def _pipeline(self, type_name: str, items: list[tuple[IngressRecord, Envelope]],
                        rejected: list[tuple[IngressRecord, str]]) -> None:
        if not items:
            return
        spec = self.services.resolver.spec(type_name)
        by_route: dict[int, list[tuple[IngressRecord, Envelope]]] = {}
        for r, env in items:
            by_route.setdefault(spec.route(env) if spec.variants else -1, []).append((r, env))
        for route, part in by_route.items():
            if type_name == "notification":
                part = await self._new_notifications(part)
            if not part:
                continue
            outcomes = await self.runner.run(type_name, route, [env for _, env in part])
            for (r, _), o in zip(part, outcomes, strict=True):
                if o.verdict is Verdict.REJECT:
                    rejected.append((r, f"{o.code}: {o.message}"))

    async def _new_notifications(self, items: list[tuple[IngressRecord, Envelope]]
                                 ) -> list[tuple[IngressRecord, Envelope]]:
        """Leaves out records whose notification is stored already (read again after a
        crash between acceptance and commit)."""
        known = await asyncio.gather(*(self.notifications.get(env.meta["notificationId"])
                                       for _, env in items))
        return [item for item, k in zip(items, known, strict=True) if k is None]

    # --- observability ----------------------------------------------------------------
    def _count(self, records: Sequence[IngressRecord], result: str) -> None:
        for r in records:
            self.recorder.inc("conveyor_ingress_records_total", type=r.type, result=result)

    def _gauges(self, rec: Recorder) -> None:
        rec.set("conveyor_ingress_paused", 1 if self.consumer.pausing else 0)
        pauses = sum(1 for _, what, _ in self.consumer.timeline if what == "pause")
        if pauses > self._pauses_seen:
            rec.inc("conveyor_ingress_pauses_total", pauses - self._pauses_seen)
            self._pauses_seen = pauses

    async def status(self, timeline: bool = True) -> dict[str, Any]:
        """``status`` (starting, ok, paused), counts, the pacer's batch and (``timeline``)
        the pause / resume transitions (wall-clock seconds)."""
        st = self.consumer.stats
        now_wall, now_mono = time.time(), time.monotonic()
        return {
            "status": "paused" if self.consumer.pausing else ("ok" if self.started else "starting"),
            "accepted": st.accepted, "refused": st.refused, "failed": st.failed,
            "deadLettered": st.dead_lettered, "batches": st.batches, "batch": self.pace.batch,
            "pauseReason": self.pace.last_reason,
            **({"timeline": [[round(now_wall - (now_mono - t), 3), what, why]
                             for t, what, why in self.consumer.timeline]} if timeline else {}),
        }

    async def health(self) -> dict[str, Any]:
        """What ``/health/ready`` shows for the ingress (no timeline)."""
        return await self.status(timeline=False)

    async def ping(self) -> bool:
        return True

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):
            await self.consumer.stop()
        self._task.cancel()
