"""The Gateway: Conveyor's ingress deployment (HTTP + WebSocket ``/v1/ws``).

Thin by design: it authenticates, parses frames, buffers them per type (bounded), and
moves *batches* through each type's pipeline (stage hosts are other deployments). It holds
the sockets, so it also pulls deliveries for them from the connection hub and writes them
in order (see ``deployments/connection.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote_plus

import orjson
from ray import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from adapters.auth import AuthError, JwtVerifier
from adapters.objects import LocalObjectStore
from cluster.telemetry import MetricsAnalytics, MetricsPusher, Recorder, labels
from deployments.connection import Connection, guarded
from deployments.drain import watch_drain
from deployments.http import ApiError, authenticate, error_response, json_response, token_of
from deployments.middleware import EXCEPTION_HANDLERS, wrap
from deployments.notifications import NotificationApi
from deployments.runner import PipelineRunner, TypeBatcher
from serve_app.bootstrap import open_services
from serve_app.settings import Settings
from serve_app.web import web_client_routes
from stages.attachments import ready_key
from stages.model import Envelope, Outcome, Verdict

log = logging.getLogger("conveyor.gateway")

# Frames the gateway answers itself; everything else must have a pipeline.
LOCAL_TYPES = {"ping", "sync"}
# Frames that belong to a chat's seq stream: written in order, gap-free, redelivered.
ORDERED_FRAMES = {"message", "command"}
MAX_CLIENT_ID = 64


class FrameError(Exception):
    def __init__(self, code: str, message: str, frame_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id


class GatewayAcks:
    """``AckSink``: ack frames to the senders' connections on this replica."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def acknowledge(self, batch: Sequence[Envelope]) -> None:
        for env in batch:
            conn = self.gateway.connections.get(env.connection or "")
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
            self.gateway.metrics.recorder.inc("conveyor_acks_total", type=env.type,
                                              status=frame["status"])


class GatewayNotices:
    """``Notices``: system frames to a connection on this replica."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def notify(self, connection: str | None, event: str, data: Mapping[str, Any]) -> None:
        conn = self.gateway.connections.get(connection or "")
        if conn is not None:
            conn.send({"type": "system", "event": event, "data": dict(data)})


def rfc3339(at: float | None = None) -> str:
    """``at`` (epoch seconds; default now) as RFC 3339 UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=1000)
@serve.ingress()
class Gateway:
    async def __init__(self, settings: dict[str, Any], hosts: dict[str, str],
                       handles: dict[str, Any], notifier: Any = None) -> None:
        self.settings = Settings(**settings)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (tests of the class itself)
            self.replica_id = "local"
        self.services = await open_services(self.settings)
        self.metrics = MetricsPusher(f"gateway:{self.replica_id}", self.settings.metrics_push_s)
        self.metrics.refresh = self._gauges
        self.metrics.start()
        self.store = self.services.store
        self.hub = self.services.hub
        self.verifier = JwtVerifier.from_settings(self.settings)
        self.notifications = await NotificationApi.open(self.settings, self.services, self.verifier,
                                                        dispatcher=notifier)
        self.connections: dict[str, Connection] = {}
        self.by_user: dict[str, set[Connection]] = {}
        self.handles = handles
        self.runner = PipelineRunner(
            self.services.resolver, self.services.registry, hosts, handles,
            local_ports={**self.services.ports(), "acks": GatewayAcks(self),
                         "notices": GatewayNotices(self),
                         "analytics": MetricsAnalytics(self.metrics.recorder)},
            observer=self.metrics.observe_stage,
            call_timeout_s=self.settings.stage_call_timeout_s,
        )
        self.costs = {t: self.settings.credit_costs.get(t, self.services.resolver.spec(t).cost)
                      for t in self.services.resolver.types}
        self.batchers: dict[str, TypeBatcher] = {}
        for type_name in self.services.resolver.types:
            spec = self.services.resolver.spec(type_name)
            self.batchers[type_name] = TypeBatcher(
                spec, self.runner, self._settle,
                capacity=self.settings.inbound_buffer,
                wait_ms=self.settings.batch_wait_ms,
                max_batch=self.settings.batch_max,
                on_drop=self._stage_dropped,
                on_retry=lambda t: self.metrics.recorder.inc("conveyor_stage_retries_total", type=t),
                on_batch=lambda t, n: self.metrics.recorder.observe("conveyor_batch_size", n, type=t),
            )
        self.dropped: dict[tuple[str, str], int] = {}
        # Connections whose hub attach failed (a hub shard restarting): the pull loop of
        # their shard attaches them once the shard answers again.
        self._unattached: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    def __serve_build_asgi_app__(self) -> Starlette:
        app = Starlette(routes=self._routes(), exception_handlers=EXCEPTION_HANDLERS)
        # Phase 2 of an attachment (copy, sniff, scan) may outlast an API call; each stage
        # call is bounded by stage_call_timeout_s instead.
        check_s = self.settings.attachment_check_timeout_s
        return wrap(app, timeout_s=self.settings.request_timeout_s,  # type: ignore[return-value]
                    max_body_bytes=self.settings.max_request_bytes,
                    longer={"/v1/storage/events": check_s, "/v1/attachments/": check_s})

    def _routes(self) -> list[BaseRoute]:
        return [
            WebSocketRoute("/v1/ws", self.ws_endpoint),
            Route("/v1/chats", self.create_chat, methods=["POST"]),
            Route("/v1/chats", self.list_chats, methods=["GET"]),
            Route("/v1/chats/{chat_id}/messages", self.chat_messages, methods=["GET"]),
            Route("/v1/presence", self.presence, methods=["GET"]),
            Route("/v1/storage/events", self.storage_events, methods=["POST"]),
            Route("/v1/attachments/{attachment_id}/complete", self.complete_attachment,
                  methods=["POST"]),
            Route("/v1/attachments/{attachment_id}/content", self.attachment_content,
                  methods=["GET"]),
            Route("/v1/uploads/{key:path}", self.local_upload, methods=["PUT"]),
            Route("/v1/uploads/{key:path}", self.local_download, methods=["GET"]),
            Route("/health/live", self.live, methods=["GET"]),
            Route("/health/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            *self.notifications.routes(),
            *web_client_routes(self.settings, self.verifier.dev_key),
        ]

    def _ensure_started(self) -> None:
        # Background loops start on the replica's serving event loop.
        if self._started:
            return
        self._started = True
        for b in self.batchers.values():
            b.start()
        for shard in range(self.hub.n):
            self._tasks.append(asyncio.create_task(self._pull_loop(shard)))
        self._tasks.append(asyncio.create_task(self._redelivery_loop()))
        self._tasks.append(asyncio.create_task(watch_drain(self, self._drain)))

    # --- WebSocket ----------------------------------------------------------------------
    async def ws_endpoint(self, ws: WebSocket) -> None:
        self._ensure_started()
        try:
            principal = await self.verifier.verify(token_of(ws, allow_query=True))
        except AuthError as exc:
            await ws.accept()
            # 4401: the client's token is bad. 1011: the server could not check it (the
            # issuer's keys are unreachable); the client should retry, not re-authenticate.
            await ws.close(code=1011 if exc.status >= 500 else 4401, reason=exc.message[:120])
            return
        await ws.accept()
        conn = Connection(
            ws, principal.user_id, self.store,
            queue_size=self.settings.connection_queue,
            implicit_receipt=self._implicit_receipt,
            on_write=self._counted_write,
            on_drop=lambda frame_type, reason: self._count_drop(frame_type, "socket", reason),
        )
        # ``connected`` is queued first, before the connection can be found by deliveries,
        # so it is always the first frame a client reads (PROTOCOL.md).
        conn.send({"type": "system", "event": "connected",
                   "data": {"userId": conn.user_id, "connectionId": conn.id,
                            "gateway": self.replica_id}})
        self.connections[conn.id] = conn
        self.by_user.setdefault(conn.user_id, set()).add(conn)
        try:
            came = await guarded(self.hub.attach(self.replica_id, [(conn.id, conn.user_id)]),
                                 "hub attach")
            if came is None:
                self._unattached.add(conn.id)
            for who in came or ():
                self._presence(who, True)
            conn.init_chats(await self.store.pointers(conn.user_id))
            conn.start()
            await self._read_loop(conn)
        except WebSocketDisconnect:
            pass
        finally:
            self.connections.pop(conn.id, None)
            self._unattached.discard(conn.id)
            peers = self.by_user.get(conn.user_id)
            if peers is not None:
                peers.discard(conn)
                if not peers:
                    del self.by_user[conn.user_id]
            await conn.stop()
            gone = await guarded(self.hub.detach(self.replica_id, [(conn.id, conn.user_id)]),
                                 "hub detach")
            for who in gone or ():
                self._presence(who, False)

    async def _read_loop(self, conn: Connection) -> None:
        while not conn.closed:
            message = await conn.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                raw_bytes = message.get("bytes") or b""
                size = len(raw_bytes)
            else:
                raw_bytes = None
                size = len(raw)  # characters ≤ bytes; the exact check follows
            try:
                if size > self.settings.max_frame_bytes or (
                    raw is not None and len(raw.encode()) > self.settings.max_frame_bytes
                ):
                    raise FrameError("too_large",
                                     f"frame exceeds {self.settings.max_frame_bytes} bytes")
                await self._on_frame(conn, raw if raw is not None else raw_bytes)
            except FrameError as exc:
                err: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message}
                if exc.frame_id is not None:
                    err["id"] = exc.frame_id
                conn.send(err)

    async def _on_frame(self, conn: Connection, raw: str | bytes | None) -> None:
        try:
            frame = orjson.loads(raw or b"")
        except orjson.JSONDecodeError:
            raise FrameError("bad_frame", "frame is not valid JSON") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise FrameError("bad_frame", "frame must be a JSON object with a string 'type'")
        ftype: str = frame["type"]
        fid = frame.get("id")
        frame_id = fid if isinstance(fid, str) else None
        if ftype == "ping":
            conn.send({"type": "pong"})
            return
        batcher = self.batchers.get(ftype)
        if batcher is not None and not batcher.spec.client:
            batcher = None
        if batcher is None and ftype not in LOCAL_TYPES:
            raise FrameError("unknown_type", f"unknown frame type {ftype!r}", frame_id)
        if ftype != "receipt" and (frame_id is None or not 0 < len(frame_id) <= MAX_CLIENT_ID
                                   or frame_id.startswith("attachment:")):  # server's dedup keys
            raise FrameError("invalid", f"'id' must be a string of 1..{MAX_CLIENT_ID} characters"
                             " not starting with 'attachment:'", frame_id)
        if ftype == "sync":
            await self._sync(conn, frame)
            return
        assert batcher is not None
        meta: dict[str, Any] = {"cost": self.costs[ftype]}
        if ftype == "receipt" and isinstance(frame.get("messageIds"), list):
            meta["latencies"] = conn.on_receipt(
                [m for m in frame["messageIds"] if isinstance(m, str)],
                "read" if frame.get("status") == "read" else "delivered")
        fields = {k: v for k, v in frame.items() if k not in ("type", "id")}
        env = Envelope(type=ftype, id=frame_id or "", sender=conn.user_id, connection=conn.id,
                       gateway=self.replica_id, fields=fields, meta=meta)
        self.metrics.recorder.inc("conveyor_messages_in_total", type=ftype)
        if batcher.spec.overflow == "drop":
            if not batcher.offer(env):
                self._dropped(env, "buffer_full")
                self._ack_overloaded(conn, env)
            return
        if batcher.offer(env):
            conn.overload_eased(ftype, batcher.depth, batcher.capacity)
            return
        # Durable: never dropped. Stop reading this socket until the buffer has room, and
        # tell the client once per overload episode (not once per frame that waits).
        self.metrics.recorder.inc("conveyor_overload_total", type=ftype)
        if conn.overload_started(ftype):
            conn.send({"type": "system", "event": "overload",
                       "data": {"type": ftype, "buffered": batcher.depth}})
        await batcher.put(env)

    async def _sync(self, conn: Connection, frame: dict[str, Any]) -> None:
        chat_id = frame.get("chatId")
        after = frame.get("afterSeq", 0)
        limit = frame.get("limit", 50)
        if not isinstance(chat_id, str) or not isinstance(after, int) or not isinstance(limit, int):
            raise FrameError("invalid", "sync needs chatId (string), afterSeq and limit (integers)",
                             frame.get("id"))
        try:
            messages, has_more = await self._history(conn.user_id, chat_id, after, limit)
        except ApiError as exc:
            raise FrameError(exc.code, exc.message, frame.get("id")) from None
        conn.send({"type": "sync", "id": frame["id"], "chatId": chat_id,
                   "messages": messages, "hasMore": has_more})

    def _presence(self, user_id: str, online: bool, last_seen: float | None = None) -> None:
        batcher = self.batchers.get("presence")
        if batcher is None:
            return
        env = Envelope(type="presence", id=f"p-{time.time_ns()}", sender=user_id,
                       gateway=self.replica_id,
                       fields={"online": online, "lastSeen": rfc3339(last_seen)})
        if not batcher.offer(env):
            self._dropped(env, "buffer_full")

    def _implicit_receipt(self, user_id: str, message_id: str) -> None:
        env = Envelope(type="receipt", id="", sender=user_id,
                       fields={"messageIds": [message_id], "status": "delivered"})
        if not self.batchers["receipt"].offer(env):
            log.info("receipt buffer full: implicit receipt for %s left to the next one", user_id)

    async def _settle(self, outcomes: list[Outcome]) -> None:
        """After a batch: rejected items get a rejected ack; drops are counted."""
        for o in outcomes:
            env = o.envelope
            if o.verdict is Verdict.DROP:
                self._dropped(env, o.code or "unspecified", stage="pipeline")
            elif o.verdict is Verdict.REJECT:
                rec = self.metrics.recorder
                rec.inc("conveyor_acks_total", type=env.type, status="rejected")
                if o.code == "credits_exhausted":
                    rec.inc("conveyor_credit_rejections_total", type=env.type)
                conn = self.connections.get(env.connection or "")
                if conn is None:
                    continue
                if env.type == "receipt":
                    conn.send({"type": "error", "code": o.code or "invalid", "message": o.message})
                    continue
                error: dict[str, Any] = {"code": o.code, "message": o.message}
                if o.retry_after is not None:
                    error["retryAfter"] = o.retry_after
                conn.send({"type": "ack", "id": env.id, "status": "rejected", "error": error})

    def _dropped(self, env: Envelope, reason: str, stage: str = "gateway") -> None:
        self._count_drop(env.type, stage, reason)
        log.info("dropped %s from %s at %s: %s", env.type, env.sender, stage, reason)

    def _count_drop(self, type_name: str, stage: str, reason: str) -> None:
        key = (type_name, reason)
        self.dropped[key] = self.dropped.get(key, 0) + 1
        self.metrics.recorder.inc("conveyor_dropped_total", type=type_name, stage=stage,
                                  reason=reason)

    def _stage_dropped(self, env: Envelope, reason: str, host: str) -> None:
        """A droppable batch a stage host refused or failed: counted against that host,
        and a client frame not acked yet is acked ``rejected``/``overloaded``, as when
        the buffer is full."""
        self._dropped(env, reason, stage=host)
        spec = self.batchers[env.type].spec
        conn = self.connections.get(env.connection or "")
        if conn is None or not spec.client or env.meta.get("acked"):
            return
        self._ack_overloaded(conn, env)

    def _ack_overloaded(self, conn: Connection, env: Envelope) -> None:
        """A dropped client frame is still answered: ``rejected`` / ``overloaded``."""
        self.metrics.recorder.inc("conveyor_acks_total", type=env.type, status="rejected")
        conn.send({"type": "ack", "id": env.id, "status": "rejected",
                   "error": {"code": "overloaded",
                             "message": f"{env.type} dropped: the server is overloaded"}})

    def _counted_write(self, frame_type: str) -> None:
        self.metrics.recorder.inc("conveyor_messages_out_total", type=frame_type)

    def _gauges(self, rec: Recorder) -> None:
        for t, b in self.batchers.items():
            rec.set("conveyor_buffer_depth", b.depth, type=t, replica=self.replica_id)
        rec.set("conveyor_connections", len(self.connections), replica=self.replica_id)
        rec.set("conveyor_deliveries_unreceipted",
                sum(c.unreceipted for c in self.connections.values()), replica=self.replica_id)

    # --- deliveries from the hub ----------------------------------------------------------
    async def _pull_loop(self, shard: int) -> None:
        actor = self.hub.actors[shard]
        while True:
            try:
                got = await actor.pull.remote(self.replica_id, self.settings.hub_pull_wait_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("hub shard %d unreachable: %r", shard, exc)
                await asyncio.sleep(1.0)
                continue
            if got is None:
                # The hub does not know us (restarted, or we were reaped): attach again.
                # Users it did not know are online again for their contacts.
                await self._attach(shard, [c for c in self.connections.values()
                                           if self.hub.shard(c.user_id) == shard], "hub re-attach")
                await self._resync(shard)
                continue
            if self._unattached:
                await self._attach_pending(shard)
            for users, frame in got:
                if frame.get("type") == "_resync":
                    await self._resync(shard)
                    continue
                if frame.get("type") == "_offline":
                    # Users of a gateway replica the hub presumed dead: their contacts
                    # hear it from whichever replica pulled first.
                    seen = frame.get("lastSeen", {})
                    for user in users:
                        self._presence(user, False, seen.get(user))
                    continue
                if frame.get("type") in ORDERED_FRAMES:
                    origin = frame.get("_origin")
                    clean = {k: v for k, v in frame.items() if k != "_origin"}
                    for user in users:
                        for conn in self.by_user.get(user, ()):
                            conn.deliver(clean, origin)
                else:
                    for user in users:
                        for conn in self.by_user.get(user, ()):
                            conn.send(frame)

    async def _attach_pending(self, shard: int) -> None:
        """Attach sockets whose attach failed at connect, now that this shard answers."""
        conns = [c for cid in list(self._unattached)
                 if (c := self.connections.get(cid)) is not None
                 and self.hub.shard(c.user_id) == shard]
        if conns and await self._attach(shard, conns, "hub attach (pending)"):
            await self._resync(shard, conns)  # what was published for them meanwhile

    async def _attach(self, shard: int, conns: list[Connection], what: str) -> bool:
        """Register ``conns`` with a hub shard; users who came online are announced.
        False when the shard did not answer (they stay unattached)."""
        came = await guarded(self.hub.actors[shard].attach.remote(
            self.replica_id, [(c.id, c.user_id) for c in conns]), what)
        if came is None:
            return False
        self._unattached.difference_update(c.id for c in conns)
        for who in came:
            self._presence(who, True)
        return True

    async def _resync(self, shard: int, only: list[Connection] | None = None) -> None:
        """Frames from this hub shard may have been lost: re-read from the store."""
        conns = only if only is not None else [
            c for c in self.connections.values() if self.hub.shard(c.user_id) == shard]
        log.info("resync of %d connections after a hub restart or shed frames", len(conns))
        for conn in conns:
            pointers = await guarded(self.store.pointers(conn.user_id), "resync pointers")
            if pointers:
                conn.resync(pointers)

    async def _redelivery_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for conn in list(self.connections.values()):
                for chat_id in conn.due_redelivery(now, self.settings.redelivery_base_s,
                                                   self.settings.redelivery_max_s):
                    self.metrics.recorder.inc("conveyor_redeliveries_total")
                    conn.catch_up(chat_id)

    # --- HTTP -----------------------------------------------------------------------------
    async def _history(self, user_id: str, chat_id: str, after: int, limit: int
                       ) -> tuple[list[dict[str, Any]], bool]:
        if after < 0 or not 1 <= limit <= 500:
            raise ApiError(400, "invalid", "afterSeq must be >= 0 and limit 1..500")
        members = await self.store.members([chat_id])
        if chat_id not in members:
            raise ApiError(404, "not_found", "no such chat")
        if user_id not in members[chat_id]:
            raise ApiError(403, "forbidden", "not a member of this chat")
        rows = await self.store.messages_after(chat_id, after, limit + 1)
        return [m.frame() for m in rows[:limit]], len(rows) > limit

    async def _guard(self, request: Request) -> Any:
        self._ensure_started()
        return await authenticate(request, self.verifier)

    async def create_chat(self, request: Request) -> Response:
        try:
            principal = await self._guard(request)
            try:
                body = orjson.loads(await request.body())
            except orjson.JSONDecodeError:
                raise ApiError(400, "invalid", "body is not valid JSON") from None
            members = body.get("members") if isinstance(body, dict) else None
            title = body.get("title") if isinstance(body, dict) else None
            if (not isinstance(members, list) or not 1 <= len(members) <= 1000
                    or not all(isinstance(m, str) and 0 < len(m) <= 128 for m in members)):
                raise ApiError(400, "invalid", "'members' must be a list of 1..1000 user ids")
            if title is not None and (not isinstance(title, str) or len(title) > 200):
                raise ApiError(400, "invalid", "'title' must be a string of at most 200 characters")
            chat_id = await self.store.create_chat(principal.user_id, members, title)
            everyone = sorted({principal.user_id, *members})
            return json_response({"chatId": chat_id, "members": everyone, "title": title}, 201)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def list_chats(self, request: Request) -> Response:
        try:
            principal = await self._guard(request)
            return json_response({"chats": await self.store.chats_of(principal.user_id)})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def chat_messages(self, request: Request) -> Response:
        try:
            principal = await self._guard(request)
            try:
                after = int(request.query_params.get("afterSeq", "0"))
                limit = int(request.query_params.get("limit", "50"))
            except ValueError:
                raise ApiError(400, "invalid", "afterSeq and limit must be integers") from None
            messages, has_more = await self._history(
                principal.user_id, request.path_params["chat_id"], after, limit)
            return json_response({"messages": messages, "hasMore": has_more})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def presence(self, request: Request) -> Response:
        try:
            await self._guard(request)
            users = [u for u in request.query_params.getlist("userId") for u in u.split(",") if u]
            if not users or len(users) > 500:
                raise ApiError(400, "invalid", "give 1..500 userId values")
            found = await self.hub.presence(users)
            out = []
            for user, online, seen in found:
                last = rfc3339(seen) if seen is not None else None
                out.append({"userId": user, "online": online, "lastSeen": last})
            return json_response({"users": out})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def metrics_endpoint(self, request: Request) -> Response:
        """Prometheus text: every process's counters plus gauges read now."""
        self._ensure_started()
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
            pending, age = await asyncio.wait_for(self.store.outbox_stats(), 5.0)
            live[("conveyor_outbox_pending", ())] = pending
            live[("conveyor_outbox_lag_seconds", ())] = age
        except Exception as exc:
            log.warning("metrics: outbox stats unavailable: %r", exc)
        try:
            backlog, oldest = await asyncio.wait_for(self.store.delivery_backlog(), 5.0)
            live[("conveyor_deliveries_pending", ())] = backlog
            live[("conveyor_delivery_lag_seconds", ())] = oldest
        except Exception as exc:
            log.warning("metrics: delivery backlog unavailable: %r", exc)
        text = await self.metrics.scrape(live)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- attachments, phase 2 ------------------------------------------------------------
    async def _uploaded(self, records: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Run attachment_uploaded for (attachment id, uploader) pairs; one batch."""
        batch = [Envelope(type="attachment_uploaded", id=f"attachment:{aid}", sender=uploader,
                          gateway=self.replica_id, fields={"attachmentId": aid})
                 for aid, uploader in records]
        outcomes = await self.runner.run("attachment_uploaded", -1, batch)
        out = []
        for o in outcomes:
            env = o.envelope
            item: dict[str, Any] = {"attachmentId": env.fields["attachmentId"]}
            if o.verdict is Verdict.REJECT:
                item.update(state=env.meta.get("attachmentState",
                                               "pending" if o.code == "not_found" else "rejected"),
                            error={"code": o.code, "message": o.message})
            else:
                item.update(state=env.meta.get("attachmentState", "ready"),
                            messageId=env.meta.get("messageId"))
            out.append(item)
        return out

    async def storage_events(self, request: Request) -> Response:
        """S3/MinIO bucket notifications (MinIO's event JSON), bearer-secret protected."""
        secret = self.settings.storage_webhook_secret
        given = token_of(request) or ""
        if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
            return error_response(401, "unauthorized", "a valid storage webhook secret is required")
        try:
            event = orjson.loads(await request.body())
            records = event["Records"] if isinstance(event, dict) else None
            if not isinstance(records, list):
                raise KeyError("Records")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return error_response(400, "invalid", "expected a bucket notification with Records")
        found: list[tuple[str, str]] = []
        ignored = 0
        for rec in records:
            try:
                name = rec["eventName"]
                key = unquote_plus(rec["s3"]["object"]["key"])
            except (KeyError, TypeError):
                ignored += 1
                continue
            att = await self.services.attachments.by_key(key) if name.startswith(
                "s3:ObjectCreated") else None
            if att is None:
                ignored += 1
                continue
            found.append((att.id, att.uploader))
        results = await self._uploaded(found) if found else []
        return json_response({"processed": len(results), "ignored": ignored, "results": results})

    async def complete_attachment(self, request: Request) -> Response:
        """The uploader confirms an upload (deployments without a storage webhook)."""
        try:
            principal = await self._guard(request)
            aid = request.path_params["attachment_id"]
            recs = await self.services.attachments.get([aid])
            rec = recs.get(aid)
            if rec is None or rec.uploader != principal.user_id:
                raise ApiError(404, "not_found", "no such attachment")
            token = request.headers.get("x-upload-token", "")
            if not hmac.compare_digest(token.encode(), rec.upload_token.encode()):
                raise ApiError(403, "forbidden", "the X-Upload-Token header must carry the "
                                                 "uploadToken of the attachment's ack")
            (result,) = await self._uploaded([(aid, principal.user_id)])
            error = result.get("error")
            if error is not None:
                # 409: not uploaded yet / being checked (retry later); 410: too late;
                # 503: the virus scan could not run (retry later); 422: the file is refused.
                status = {"not_uploaded": 409, "in_progress": 409, "conflict": 409,
                          "not_found": 404, "expired": 410, "deleted": 410,
                          "scan_failed": 503}.get(error["code"], 422)
                return json_response(result, status)
            return json_response(result)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def attachment_content(self, request: Request) -> Response:
        """Members get a short-lived download URL (a redirect to the object store)."""
        try:
            principal = await self._guard(request)
            aid = request.path_params["attachment_id"]
            rec = (await self.services.attachments.get([aid])).get(aid)
            members = await self.store.members([rec.chat_id]) if rec else {}
            if rec is None or principal.user_id not in members.get(rec.chat_id, ()):
                raise ApiError(404, "not_found", "no such attachment")
            if rec.state in ("deleted", "expired"):
                raise ApiError(410, "gone", f"attachment is {rec.state}")
            if rec.state != "ready":
                raise ApiError(409, "not_ready", f"attachment is {rec.state}")
            # The checked copy, never the upload (which its uploader could still overwrite).
            url = await self.services.objects.download_url(ready_key(rec), 300, rec.file_name)
            return Response(status_code=307, headers={"Location": url,
                                                      "Cache-Control": "private, no-store"})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    def _local_objects(self, request: Request) -> tuple[LocalObjectStore, str, int, int]:
        objects = self.services.objects
        if not isinstance(objects, LocalObjectStore):
            raise ApiError(404, "not_found", "uploads go to the object store directly")
        try:
            expires = int(request.query_params["expires"])
            size = int(request.query_params["size"])
            sig = request.query_params["sig"]
        except (KeyError, ValueError):
            raise ApiError(403, "forbidden", "missing or malformed signature") from None
        key = request.path_params["key"]
        method = "PUT" if request.method == "PUT" else "GET"
        if not objects.verify(method, key, expires, size, sig):
            raise ApiError(403, "forbidden", "invalid or expired signature")
        return objects, key, expires, size

    async def local_upload(self, request: Request) -> Response:
        """The embedded object store's upload endpoint; on success it reports the upload
        itself, as a bucket notification would. Only a pending attachment takes bytes: once
        it is being checked, or done, its upload URL is refused."""
        try:
            objects, key, _, size = self._local_objects(request)
            att = await self.services.attachments.by_key(key)
            if att is None or att.state != "pending":
                raise ApiError(409, "conflict", "this upload URL takes no more uploads (the "
                               f"attachment is {att.state if att else 'unknown'})")
            try:
                await objects.write(key, request.stream(),
                                    request.headers.get("content-type"), limit=size)
            except ValueError as exc:
                raise ApiError(413, "too_large", str(exc)) from None
            results = await self._uploaded([(att.id, att.uploader)])
            return json_response({"stored": True, "results": results})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def local_download(self, request: Request) -> Response:
        try:
            objects, key, _, _ = self._local_objects(request)
            info = await objects.stat(key)
            if info is None:
                raise ApiError(404, "not_found", "no such object")
            # Served from the app's own origin: always a download, never rendered.
            return FileResponse(
                objects.path(key), media_type=info.content_type or "application/octet-stream",
                filename=key.rsplit("/", 1)[-1], content_disposition_type="attachment",
                headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-store",
                         "Content-Security-Policy": "sandbox; default-src 'none'"})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def live(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        self._ensure_started()
        checks: dict[str, dict[str, Any]] = {}

        async def check(name: str, coro: Any) -> None:
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(coro, 5.0)
                checks[name] = {"status": "up", "latencyMs": round((time.monotonic() - t0) * 1000, 1)}
            except Exception as exc:
                checks[name] = {"status": "down", "error": repr(exc)[:200]}

        await asyncio.gather(
            check("database", self.store.ping()),
            check("hub", self.hub.stats()),
            check("objects", self.services.objects.ping()),
            *(check(f"deployment:{name}", h.ping.remote()) for name, h in self.handles.items()),
            *(check(name, fn()) for name, fn in self.notifications.health_checks().items()),
        )
        ok = all(c["status"] == "up" for c in checks.values())
        return json_response({"status": "ready" if ok else "unavailable", "checks": checks},
                             200 if ok else 503)

    async def check_health(self) -> None:
        await self.store.ping()

    async def _drain(self) -> None:
        """Replica shutting down: tell clients to reconnect (to another replica) and close
        their sockets. Nothing is lost: accepted messages are in PostgreSQL and anything
        not receipted is replayed when they reconnect."""
        self.draining = True
        for conn in list(self.connections.values()):
            conn.closed = True
            with contextlib.suppress(Exception):
                await conn.ws.send_text(orjson.dumps(
                    {"type": "system", "event": "reconnect",
                     "data": {"reason": "gateway shutting down", "retryAfter": 1}}).decode())
                await conn.ws.close(code=1012)

    async def __del__(self) -> None:
        if not getattr(self, "draining", False):
            await self._drain()
