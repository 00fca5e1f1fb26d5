"""The Gateway: Conveyor's ingress deployment (HTTP + WebSocket ``/v1/ws``).

Thin by design. This module holds its lifecycle and the socket loop; the parts are:
``frames`` (client frames in), ``intake`` (buffers, batches, acks), ``hub_link``
(deliveries from the hub, redelivery), one module per HTTP resource (``chats_api``,
``attachments_api``, ``uploads_api``, ``health_api``, ``metrics_api``) and the
notification API (``deployments.notifications.api``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from ray import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from adapters.auth import AuthError, Principal
from cluster.telemetry import MetricsAnalytics, MetricsOutages, MetricsPusher, Recorder
from deployments.gateway.attachments_api import AttachmentsApi
from deployments.gateway.chats_api import ChatsApi
from deployments.gateway.close_codes import BAD_TOKEN, SERVER_ERROR, reason
from deployments.gateway.connection import Connection
from deployments.gateway.drain import watch_drain
from deployments.gateway.frames import LOCAL_TYPES, FrameError, check_client_id, frame_id, read_frame
from deployments.gateway.health_api import HealthApi
from deployments.gateway.hub_link import HubLink
from deployments.gateway.intake import Intake, SessionAcks, SessionNotices
from deployments.gateway.limits import ConnectionLimits
from deployments.gateway.metrics_api import MetricsApi
from deployments.gateway.sessions import Sessions
from deployments.gateway.uploads_api import UploadsApi
from deployments.http import ApiError, authenticate, token_of
from deployments.middleware import EXCEPTION_HANDLERS, wrap
from deployments.notifications.api import NotificationApi
from deployments.pipeline_runner import PipelineRunner
from deployments.services import Check, SoftCheck, Wiring
from stages.notifications import DispatchKick

log = logging.getLogger("conveyor.gateway")
MAX_SEQ = 2**63 - 1  # PostgreSQL bigint: a larger afterSeq cannot name a stored seq


def _integer(value: Any) -> bool:
    """A JSON integer (``True`` is an ``int`` to Python, not to the protocol)."""
    return isinstance(value, int) and not isinstance(value, bool)


def replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica (tests of the class itself)
        return "local"


# Defaults equal serve_app/config.yaml's; the Serve config is where operators change them.
@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=2000)
@serve.ingress()
class Gateway:
    async def __init__(self, wiring: Wiring, hosts: dict[str, str], handles: dict[str, Any],
                       notifier: Any = None, bus: dict[str, Any] | None = None) -> None:
        """``bus``: handles of the event relay and the Kafka ingress, when deployed (their
        state is soft readiness detail: the chat works without them)."""
        self.replica_id = replica_id()
        self.services = svc = await wiring.open_chat()
        self.settings = s = svc.settings
        self.metrics = MetricsPusher(f"gateway:{self.replica_id}", s.metrics_push_s)
        self.metrics.refresh = self._gauges
        recorder = self.metrics.recorder
        outages = MetricsOutages(recorder)
        self.sessions = Sessions()
        self.limits = ConnectionLimits(s.max_connections_per_user, s.connection_attempts_per_minute)
        self.handles = handles
        notices = await wiring.open_notifications(notifier)
        ports = svc.ports.with_(
            acks=SessionAcks(self.sessions, recorder), notices=SessionNotices(self.sessions),
            local_delivery=self.sessions,
            analytics=MetricsAnalytics(recorder), outages=outages,
            notification_store=notices.store, notification_dispatch=notices.kick)
        self.runner = PipelineRunner(svc.resolver, svc.registry, hosts, handles, local_ports=ports,
                                     observer=self.metrics.observe_stage,
                                     call_timeout_s=s.stage_call_timeout_s)
        self.intake = Intake(s, svc.resolver, self.runner, self.sessions, recorder, self.replica_id)
        self.runner.on_hop = self.intake.hop
        self.hub_link = HubLink(s, svc.hub, svc.chats, self.sessions, self.intake, recorder,
                                outages, self.replica_id)
        self.chats_api = ChatsApi(svc.chats, svc.messages, svc.hub, self._guard,
                                  svc.ports.contacts if s.presence_scope == "contacts" else None)
        self.attachments_api = AttachmentsApi(svc.attachments, svc.objects, svc.chats, self.runner,
                                              self._guard, s.storage_webhook_secret,
                                              self.replica_id)
        self.notifications = NotificationApi(
            s, notices.store, svc.resolver.pipeline("notification", svc.registry, ports),
            svc.verifier)
        self.checks: dict[str, Check] = {
            **svc.checks, **notices.checks,
            **{f"deployment:{name}": self._pinger(h) for name, h in handles.items()},
        }
        self.soft_checks: dict[str, SoftCheck] = dict(svc.soft_checks)
        for name, handle in (bus or {}).items():
            self.soft_checks[name] = self._soft(handle)
        self._cache_reads = (0, 0)
        self._kick: DispatchKick | None = notices.kick
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self.draining = False
        self.metrics.start()

    @staticmethod
    def _pinger(handle: Any) -> Check:
        return lambda: handle.ping.remote()

    @staticmethod
    def _soft(handle: Any) -> SoftCheck:
        return lambda: handle.health.remote()

    def __serve_build_asgi_app__(self) -> Starlette:
        app = Starlette(routes=self._routes(), exception_handlers=EXCEPTION_HANDLERS)
        # Phase 2 of an attachment (copy, sniff, scan) may outlast an API call; each stage
        # call is bounded by stage_call_timeout_s instead.
        s = self.settings
        check_s = s.attachment_check_timeout_s
        return wrap(app, timeout_s=s.request_timeout_s,  # type: ignore[return-value]
                    max_body_bytes=s.max_request_bytes,
                    longer={"/v1/storage/events": check_s, "/v1/attachments/": check_s})

    def _routes(self) -> list[BaseRoute]:
        uploads = UploadsApi(self.services.uploads, self.services.attachments,
                             self.attachments_api.uploaded)
        return [
            WebSocketRoute("/v1/ws", self.ws_endpoint),
            *self.chats_api.routes(),
            *self.attachments_api.routes(),
            *uploads.routes(),
            *HealthApi(lambda: self.checks, lambda: self.soft_checks).routes(),
            *MetricsApi(self.metrics, self.services.hub, self.services.outbox,
                        self.services.chats).routes(),
            *self.notifications.routes(),
            *self.services.routes,
        ]

    def _ensure_started(self) -> None:
        # Background loops start on the replica's serving event loop (the first request).
        if self._started:
            return
        self._started = True
        self.intake.start()
        self._tasks.extend(self.hub_link.tasks())
        self._tasks.append(asyncio.create_task(watch_drain(self, self._drain)))

    async def _guard(self, request: Request) -> Principal:
        self._ensure_started()
        return await authenticate(request, self.services.verifier)

    # --- WebSocket ----------------------------------------------------------------------
    async def ws_endpoint(self, ws: WebSocket) -> None:
        self._ensure_started()
        try:
            principal = await self.services.verifier.verify(token_of(ws, allow_query=True))
        except AuthError as exc:
            await ws.accept()
            # 4401: the client's token is bad. 1011: the server could not check it (the
            # issuer's keys are unreachable); the client should retry, not re-authenticate.
            await ws.close(code=SERVER_ERROR if exc.status >= 500 else BAD_TOKEN,
                           reason=reason(exc.message))
            return
        conn = Connection(
            ws, principal.user_id, self.services.chats, self.services.messages,
            queue_size=self.settings.connection_queue,
            implicit_receipt=self.intake.implicit_receipt,
            on_write=self._counted_write,
            on_drop=lambda frame_type, reason: self.intake.count_drop(frame_type, "socket", reason),
            on_hop=self.intake.hop,
            unreceipted_max=self.settings.connection_unreceipted_max,
            slow_consumer_s=self.settings.slow_consumer_s,
            on_slow=lambda why: self.metrics.recorder.inc("conveyor_slow_consumers_total"),
        )
        # The per-user caps, cluster-wide (limits.py): admitted, the connection holds a
        # slot at its hub shard until ``disconnected`` below gives it back.
        refusal = await self.hub_link.admit(conn, self.limits)
        if refusal is not None:
            self.metrics.recorder.inc("conveyor_connections_refused_total", code=str(refusal.code))
            await ws.accept()
            await ws.close(code=refusal.code, reason=reason(refusal.reason))
            return
        try:
            await ws.accept()
            # ``connected`` is queued first, before the connection can be found by
            # deliveries, so it is always the first frame a client reads (PROTOCOL.md).
            conn.send({"type": "system", "event": "connected",
                       "data": {"userId": conn.user_id, "connectionId": conn.id,
                                "gateway": self.replica_id}})
            self.sessions.add(conn)
            await self.hub_link.connected(conn)
            conn.init_chats(await self.services.chats.pointers(conn.user_id))
            conn.start()
            await self._read_loop(conn)
        except WebSocketDisconnect:
            pass
        finally:
            self.sessions.remove(conn)
            await conn.stop()
            await self.hub_link.disconnected(conn)

    async def _read_loop(self, conn: Connection) -> None:
        while not conn.closed:
            message = await conn.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame: dict[str, Any] | None = None
            try:
                frame = read_frame(message, self.settings.max_frame_bytes)
                await self._on_frame(conn, frame)
            except FrameError as exc:
                conn.send(exc.frame())
            except Exception:
                # A fault of ours (a store unreachable during a sync...): the frame is
                # answered and the socket stays usable.
                log.exception("frame of %s failed", conn.user_id)
                conn.send(FrameError("internal", "the server failed to handle this frame",
                                     None if frame is None else frame_id(frame)).frame())

    async def _on_frame(self, conn: Connection, frame: dict[str, Any]) -> None:
        ftype: str = frame["type"]
        if ftype == "ping":
            conn.send({"type": "pong"})
            return
        batcher = self.intake.client_batcher(ftype)
        if batcher is None and ftype not in LOCAL_TYPES:
            raise FrameError("unknown_type", f"unknown frame type {ftype!r}", frame_id(frame))
        fid = frame_id(frame) if ftype == "receipt" else check_client_id(frame)
        if ftype == "sync":
            await self._sync(conn, frame)
            return
        await self.intake.submit(conn, ftype, fid, frame)

    async def _sync(self, conn: Connection, frame: dict[str, Any]) -> None:
        chat_id = frame.get("chatId")
        after = frame.get("afterSeq", 0)
        limit = frame.get("limit", 50)
        if (not isinstance(chat_id, str) or not _integer(after) or not _integer(limit)
                or not 0 <= after <= MAX_SEQ):
            raise FrameError("invalid", "sync needs chatId (string), afterSeq (0.."
                             f"{MAX_SEQ}) and limit (integers)", frame.get("id"))
        try:
            messages, has_more = await self.chats_api.history(conn.user_id, chat_id, after, limit)
        except ApiError as exc:
            raise FrameError(exc.code, exc.message, frame.get("id")) from None
        conn.send({"type": "sync", "id": frame["id"], "chatId": chat_id,
                   "messages": messages, "hasMore": has_more})

    def _counted_write(self, frame_type: str) -> None:
        self.metrics.recorder.inc("conveyor_messages_out_total", type=frame_type)

    def _gauges(self, rec: Recorder) -> None:
        self.intake.gauges(rec)
        conns = self.sessions.all()
        rec.set("conveyor_connections", len(conns), replica=self.replica_id)
        rec.set("conveyor_deliveries_unreceipted", sum(c.unreceipted for c in conns),
                replica=self.replica_id)
        cache = self.services.cache
        if cache is not None:
            rec.set("conveyor_cache_available", 1 if cache.available else 0,
                    replica=self.replica_id)
            hits, misses = self._cache_reads
            if cache.hits > hits:
                rec.inc("conveyor_cache_reads_total", cache.hits - hits, result="hit")
            if cache.misses > misses:
                rec.inc("conveyor_cache_reads_total", cache.misses - misses, result="miss")
            self._cache_reads = (cache.hits, cache.misses)

    async def check_health(self) -> None:
        await self.services.chats.ping()

    async def _drain(self) -> None:
        """Replica shutting down: tell clients to reconnect (to another replica) and close
        their sockets. Nothing is lost: accepted messages are in PostgreSQL and anything
        not receipted is replayed when they reconnect."""
        self.draining = True
        for conn in self.sessions.all():
            conn.closed = True
            with contextlib.suppress(Exception):
                await conn.ws.send_text(orjson.dumps(
                    {"type": "system", "event": "reconnect",
                     "data": {"reason": "gateway shutting down", "retryAfter": 1}}).decode())
                await conn.ws.close(code=1012)

    async def __del__(self) -> None:
        if not getattr(self, "draining", False):
            await self._drain()
