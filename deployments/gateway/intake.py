"""``Intake``: frames become envelopes, go through a bounded buffer per type, and run
down their pipelines in batches; senders get their acks, refusals and drop notices.

Backpressure at the entrance (PROTOCOL.md, ARCHITECTURE.md): a durable type whose buffer
is full stops the socket's reads (one ``overload`` frame per episode); a droppable one is
dropped, counted and acked ``rejected``/``overloaded``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cluster.telemetry import Recorder
from deployments.batcher import TypeBatcher
from deployments.gateway.connection import Connection
from deployments.gateway.sessions import Sessions
from deployments.pipeline_runner import PipelineRunner
from settings import Settings
from stages.model import Envelope, Outcome, Verdict
from stages.resolver import Resolver

log = logging.getLogger("conveyor.gateway")


def rfc3339(at: float | None = None) -> str:
    """``at`` (epoch seconds; default now) as RFC 3339 UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class SessionAcks:
    """``AckSink``: ack frames to the senders' connections on this replica."""

    def __init__(self, sessions: Sessions, recorder: Recorder) -> None:
        self.sessions = sessions
        self.recorder = recorder

    async def acknowledge(self, batch: Sequence[Envelope]) -> None:
        for env in batch:
            conn = self.sessions.get(env.connection)
            if conn is None:
                continue
            frame: dict[str, Any] = {
                "type": "ack",
                "id": env.id,
                "status": "duplicate" if env.meta.get("duplicate") else "accepted",
            }
            for key in ("messageId", "chatId", "seq"):
                if key in env.meta:
                    frame[key] = env.meta[key]
            frame.update(env.meta.get("ack", {}))
            # A batch dropped after this point must not contradict the ack.
            env.meta["acked"] = True
            conn.send(frame)
            self.recorder.inc("conveyor_acks_total", type=env.type, status=frame["status"])
            self.recorder.observe("conveyor_hop_seconds", max(time.time() - env.received_at, 0.0),
                                  hop="ack")


class SessionNotices:
    """``Notices``: system frames to a connection on this replica."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def notify(self, connection: str | None, event: str, data: Mapping[str, Any]) -> None:
        conn = self.sessions.get(connection)
        if conn is not None:
            conn.send({"type": "system", "event": event, "data": dict(data)})


class Intake:
    def __init__(self, settings: Settings, resolver: Resolver, runner: PipelineRunner,
                 sessions: Sessions, recorder: Recorder, replica_id: str) -> None:
        self.settings = settings
        self.sessions = sessions
        self.recorder = recorder
        self.replica_id = replica_id
        self.costs = {t: settings.credit_costs.get(t, resolver.spec(t).cost) for t in resolver.types}
        self.batchers: dict[str, TypeBatcher] = {
            t: TypeBatcher(
                resolver.spec(t), runner, self.settle,
                capacity=settings.inbound_buffer, wait_ms=settings.batch_wait_ms,
                max_batch=settings.batch_max, on_drop=self.stage_dropped,
                on_retry=lambda t: recorder.inc("conveyor_stage_retries_total", type=t),
                on_batch=lambda t, n: recorder.observe("conveyor_batch_size", n, type=t),
                on_hop=self.hop,
            )
            for t in resolver.types
        }

    def hop(self, hop: str, seconds: float) -> None:
        """Wall time of one hop of the path (``conveyor_hop_seconds``)."""
        self.recorder.observe("conveyor_hop_seconds", max(seconds, 0.0), hop=hop)

    def start(self) -> None:
        for b in self.batchers.values():
            b.start()

    def client_batcher(self, frame_type: str) -> TypeBatcher | None:
        """The buffer of a type clients may send, or None."""
        b = self.batchers.get(frame_type)
        return b if b is not None and b.spec.client else None

    async def submit(self, conn: Connection, frame_type: str, frame_id: str | None,
                     frame: dict[str, Any]) -> None:
        """Buffer one client frame of a pipelined type (checked already)."""
        batcher = self.batchers[frame_type]
        meta: dict[str, Any] = {"cost": self.costs[frame_type]}
        if frame_type == "receipt" and isinstance(frame.get("messageIds"), list):
            meta["latencies"] = conn.on_receipt(
                [m for m in frame["messageIds"] if isinstance(m, str)],
                "read" if frame.get("status") == "read" else "delivered")
        fields = {k: v for k, v in frame.items() if k not in ("type", "id")}
        env = Envelope(type=frame_type, id=frame_id or "", sender=conn.user_id, connection=conn.id,
                       gateway=self.replica_id, fields=fields, meta=meta)
        self.recorder.inc("conveyor_messages_in_total", type=frame_type)
        if batcher.spec.overflow == "drop":
            if not batcher.offer(env):
                self.dropped(env, "buffer_full")
                self.ack_overloaded(conn, env)
            return
        if batcher.offer(env):
            conn.overload_eased(frame_type, batcher.depth, batcher.capacity)
            return
        # Durable: never dropped. Stop reading this socket until the buffer has room, and
        # tell the client once per overload episode (not once per frame that waits).
        self.recorder.inc("conveyor_overload_total", type=frame_type)
        if conn.overload_started(frame_type):
            conn.send({"type": "system", "event": "overload",
                       "data": {"type": frame_type, "buffered": batcher.depth}})
        await batcher.put(env)

    def presence(self, user_id: str, online: bool, last_seen: float | None = None) -> None:
        """A presence change of a user, fanned out to their contacts (droppable)."""
        batcher = self.batchers.get("presence")
        if batcher is None:
            return
        env = Envelope(type="presence", id=f"p-{time.time_ns()}", sender=user_id,
                       gateway=self.replica_id,
                       fields={"online": online, "lastSeen": rfc3339(last_seen)})
        if not batcher.offer(env):
            self.dropped(env, "buffer_full")

    def implicit_receipt(self, user_id: str, message_id: str) -> None:
        env = Envelope(type="receipt", id="", sender=user_id,
                       fields={"messageIds": [message_id], "status": "delivered"})
        if not self.batchers["receipt"].offer(env):
            log.info("receipt buffer full: implicit receipt for %s left to the next one", user_id)

    async def settle(self, outcomes: list[Outcome]) -> None:
        """After a batch: rejected items get a rejected ack; drops are counted."""
        for o in outcomes:
            env = o.envelope
            if o.verdict is Verdict.DROP:
                self.dropped(env, o.code or "unspecified", stage="pipeline")
            elif o.verdict is Verdict.REJECT:
                self.recorder.inc("conveyor_acks_total", type=env.type, status="rejected")
                if o.code == "credits_exhausted":
                    self.recorder.inc("conveyor_credit_rejections_total", type=env.type)
                conn = self.sessions.get(env.connection)
                if conn is None:
                    continue
                if env.type == "receipt":
                    conn.send({"type": "error", "code": o.code or "invalid", "message": o.message})
                    continue
                error: dict[str, Any] = {"code": o.code, "message": o.message}
                if o.retry_after is not None:
                    error["retryAfter"] = o.retry_after
                conn.send({"type": "ack", "id": env.id, "status": "rejected", "error": error})

    def dropped(self, env: Envelope, reason: str, stage: str = "gateway") -> None:
        self.count_drop(env.type, stage, reason)
        log.info("dropped %s from %s at %s: %s", env.type, env.sender, stage, reason)

    def count_drop(self, type_name: str, stage: str, reason: str) -> None:
        self.recorder.inc("conveyor_dropped_total", type=type_name, stage=stage, reason=reason)

    def stage_dropped(self, env: Envelope, reason: str, host: str) -> None:
        """A droppable batch a stage host refused or failed: counted against that host,
        and a client frame not acked yet is acked ``rejected``/``overloaded``, as when
        the buffer is full."""
        self.dropped(env, reason, stage=host)
        spec = self.batchers[env.type].spec
        conn = self.sessions.get(env.connection)
        if conn is None or not spec.client or env.meta.get("acked"):
            return
        self.ack_overloaded(conn, env)

    def ack_overloaded(self, conn: Connection, env: Envelope) -> None:
        """A dropped client frame is still answered: ``rejected`` / ``overloaded``."""
        self.recorder.inc("conveyor_acks_total", type=env.type, status="rejected")
        conn.send({"type": "ack", "id": env.id, "status": "rejected",
                   "error": {"code": "overloaded",
                             "message": f"{env.type} dropped: the server is overloaded"}})

    def gauges(self, rec: Recorder) -> None:
        for t, b in self.batchers.items():
            rec.set("conveyor_buffer_depth", b.depth, type=t, replica=self.replica_id)
