"""The notification service: its HTTP API (mounted in the gateway) and its dispatcher.

``NotificationApi`` answers ``POST /v1/notifications`` (one object or 1..100), ``GET
/v1/notifications/{id}``, ``/api-docs`` and ``/openapi.json``. A POST runs its items as
*one batch* through the ``notification`` pipeline of ``pipelines.yaml`` (validate →
persist → route), in-process in the gateway: the stages are cheap, the gateway already
holds a database pool, and a hop to a stage host per request would cost more than the
stages themselves. Immediate notifications are handed to ``NotificationDispatcher``;
if that hand-off is lost, the dispatcher's outbox loop sends them anyway.

``NotificationDispatcher`` (a Serve deployment, one replica) runs ``DispatchEngine``:
immediate notifications at once, queued ones flushed in batches every
``notification_flush_interval_s``, retries with backoff and jitter, every attempt
recorded, final state stored. A dead process loses nothing: its leases expire and the
outbox rows are claimed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from ray import serve
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from adapters.auth import AuthError, JwtVerifier, Principal
from adapters.bitrix import BitrixChannel
from adapters.mailfiles import MailDirChannel
from adapters.notifications_store import NotificationsStore
from adapters.smtp import SmtpChannel
from cluster.telemetry import Recorder
from deployments.http import json_response
from deployments.middleware import error_body
from serve_app.settings import Settings
from stages.model import Envelope, Verdict
from stages.notifications import (
    MAX_ITEMS,
    Channel,
    CircuitBreaker,
    GuardedChannel,
    Job,
    RetryPolicy,
    dispatch_round,
    list_size_issues,
)
from stages.pipeline import Pipeline

log = logging.getLogger("conveyor.notifications")
PREFIX = "/v1/notifications"

TEXTS = {
    "ru": {
        "all": "Все уведомления приняты в обработку: {accepted} принято",
        "partial": "Уведомления приняты частично: {accepted} принято, {rejected} отклонено",
        "none": "Ни одно уведомление не прошло валидацию",
        "json": "Тело запроса не является корректным JSON",
        "content_type": "Требуется заголовок Content-Type: application/json",
        "conflict": "Ключ идемпотентности уже использован с другим телом запроса",
        "in_flight": "Запрос с этим ключом идемпотентности ещё обрабатывается",
        "key": "Idempotency-Key должен содержать от 1 до 255 печатных символов",
    },
    "en": {
        "all": "All notifications accepted for processing: {accepted} accepted",
        "partial": "Notifications partially accepted: {accepted} accepted, {rejected} rejected",
        "none": "No notification passed validation",
        "json": "The request body is not valid JSON",
        "content_type": "Content-Type: application/json is required",
        "conflict": "The idempotency key was already used with a different request body",
        "in_flight": "A request with this idempotency key is still being processed",
        "key": "Idempotency-Key must be 1..255 printable characters",
    },
}


def language(request: Request) -> str:
    accept = request.headers.get("accept-language", "").strip().lower()
    return "en" if accept.startswith("en") else "ru"


def problem(status: int, message: str, code: str, **more: Any) -> Response:
    body = orjson.loads(error_body(PREFIX, status, code, message))
    body.update(more)
    headers = {"WWW-Authenticate": 'Bearer realm="conveyor"'} if status == 401 else None
    return json_response(body, status, headers)


def request_hash(raw: bytes) -> str:
    """Same JSON value → same hash, whatever the whitespace or key order."""
    try:
        canonical = orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        canonical = raw
    return hashlib.sha256(canonical).hexdigest()


class HandleKick:
    """``DispatchKick`` over the dispatcher's deployment handle: fire and forget."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._pending: set[asyncio.Task[Any]] = set()

    def kick(self, ids: Sequence[str]) -> None:
        async def call() -> None:
            try:
                await self.handle.dispatch_now.remote(list(ids))
            except Exception as exc:  # the outbox loop will send them
                log.warning("dispatch hand-off of %d notifications lost: %r", len(ids), exc)

        task = asyncio.get_running_loop().create_task(call())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def build_channels(settings: Settings) -> tuple[dict[str, Channel], dict[str, Any]]:
    """(channels by contact type, each behind a circuit breaker; raw adapters by name)."""
    raw: dict[str, Any] = {}
    if settings.smtp_host:
        raw["smtp"] = SmtpChannel(
            settings.smtp_host, settings.smtp_port, mail_from=settings.mail_from,
            subject=settings.mail_subject, username=settings.smtp_username,
            password=settings.smtp_password, use_tls=settings.smtp_use_tls,
            start_tls=settings.smtp_starttls, timeout_s=settings.smtp_timeout_s,
            pool_size=settings.smtp_pool_size)
        email: Channel = raw["smtp"]
    else:
        raw["mail_dir"] = email = MailDirChannel(settings.mail_path, settings.mail_from,
                                                 settings.mail_subject)
    channels: dict[str, Channel] = {"email": email}
    if settings.bitrix_webhook_url:
        raw["bitrix"] = BitrixChannel(settings.bitrix_webhook_url,
                                      rate_per_s=settings.bitrix_rate_per_s,
                                      burst=settings.bitrix_burst,
                                      timeout_s=settings.bitrix_timeout_s)
        channels["bitrix"] = raw["bitrix"]
    guarded: dict[str, Channel] = {
        kind: GuardedChannel(ch, CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s))
        for kind, ch in channels.items()
    }
    return guarded, raw


# --------------------------------------------------------------------------------------
# HTTP API
# --------------------------------------------------------------------------------------


class NotificationApi:
    def __init__(self, settings: Settings, store: NotificationsStore, pipeline: Pipeline,
                 verifier: JwtVerifier, health: dict[str, Callable[[], Awaitable[Any]]]) -> None:
        self.settings = settings
        self.store = store
        self.pipeline = pipeline
        self.verifier = verifier
        self._health = health

    @classmethod
    async def open(cls, settings: Settings, services: Any, verifier: JwtVerifier,
                   dispatcher: Any = None) -> NotificationApi:
        store = services.extra.get("notification_store") or NotificationsStore(services.pool)
        kick = HandleKick(dispatcher) if dispatcher is not None else None
        ports = services.ports(notification_store=store, notification_dispatch=kick)
        pipeline = services.resolver.pipeline("notification", services.registry, ports)
        _, raw = build_channels(settings)
        health: dict[str, Callable[[], Awaitable[Any]]] = {}
        if "smtp" in raw:
            health["smtp"] = raw["smtp"].ping
        if "bitrix" in raw:
            health["bitrix"] = raw["bitrix"].ping
        if dispatcher is not None:
            health["notification_dispatcher"] = lambda: dispatcher.ping.remote()
        return cls(settings, store, pipeline, verifier, health)

    def routes(self) -> list[BaseRoute]:
        from serve_app.openapi import docs_routes

        return [
            Route(PREFIX, self.post, methods=["POST"]),
            Route(PREFIX + "/{notification_id}", self.get, methods=["GET"]),
            *docs_routes(),
        ]

    def health_checks(self) -> dict[str, Callable[[], Awaitable[Any]]]:
        return dict(self._health)

    async def _principal(self, request: Request, role: str | None) -> Principal:
        auth = request.headers.get("authorization")
        scheme, _, token = (auth or "").partition(" ")
        principal = await self.verifier.verify(token.strip() if scheme.lower() == "bearer" else None)
        principal.require(role)
        return principal

    # --- POST /v1/notifications -------------------------------------------------------
    async def post(self, request: Request) -> Response:
        lang = language(request)
        texts = TEXTS[lang]
        try:
            principal = await self._principal(request, self.settings.notifications_role)
        except AuthError as exc:
            return problem(exc.status, exc.message, exc.code)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            return problem(400, texts["content_type"], "unsupported_content_type", details=[])
        raw = await request.body()
        key = request.headers.get("idempotency-key")
        if key is None:
            return await self._accept(request, principal, raw, lang)
        if not 0 < len(key) <= 255 or not key.isprintable():
            return problem(400, texts["key"], "invalid_idempotency_key", details=[])
        claim = await self.store.idempotency_begin(
            principal.user_id, key, request_hash(raw), self.settings.idempotency_ttl_s,
            lease_s=max(60.0, self.settings.request_timeout_s * 3))
        if claim.outcome == "conflict":
            return problem(422, texts["conflict"], "idempotency_key_reused")
        if claim.outcome == "in_flight":
            return problem(409, texts["in_flight"], "idempotency_key_in_flight")
        if claim.outcome == "replay":
            assert claim.status is not None and claim.body is not None
            return Response(claim.body, claim.status, media_type="application/json",
                            headers={"Idempotency-Replayed": "true"})
        try:
            response = await self._accept(request, principal, raw, lang)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.idempotency_release(principal.user_id, key))
            raise
        if response.status_code < 500:
            await self.store.idempotency_finish(principal.user_id, key, response.status_code,
                                                bytes(response.body))
        else:
            await self.store.idempotency_release(principal.user_id, key)
        return response

    async def _accept(self, request: Request, principal: Principal, raw: bytes, lang: str) -> Response:
        texts = TEXTS[lang]
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return problem(400, texts["json"], "invalid_json", details=[])
        if isinstance(body, list):
            issues = list_size_issues(body, [], 1, MAX_ITEMS)
            if issues:
                item = body if not body else None  # a 101-item echo helps nobody
                return json_response({"error": "HTTP 400 Bad Request", "message": texts["none"],
                                      "details": [{"item": item, "error": issues}]}, 400)
            items = body
        else:
            items = [body]
        subject: dict[str, Any] = {"id": principal.user_id}
        if principal.name:
            subject["name"] = principal.name
        trace = request.scope.get("state", {}).get("trace_id") or uuid.uuid4().hex
        now = time.time()
        batch = [Envelope(type="notification", id=f"{trace}:{i}", sender=principal.user_id,
                          received_at=now, fields={"notification": item},
                          meta={"subject": subject}) for i, item in enumerate(items)]
        outcomes = await self.pipeline.run(batch)
        details: list[dict[str, Any]] = []
        accepted = 0
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome.verdict is Verdict.REJECT:
                details.append({"status": "failure", "notification": item,
                                "error": outcome.envelope.meta.get("errors") or [
                                    {"code": "custom", "message": outcome.message or "", "path": []}]})
            else:
                accepted += 1
                n = outcome.envelope.meta["notification"]
                details.append({"status": "success", "notification": n})
                log.info("notification %s accepted (%s) trace %s", n["id"],
                         outcome.envelope.meta.get("route"), trace)
        rejected = len(items) - accepted
        if accepted == 0:
            return json_response({
                "error": "HTTP 400 Bad Request", "message": texts["none"],
                "details": [{"item": d["notification"], "error": d["error"]} for d in details],
            }, 400)
        key = "all" if rejected == 0 else "partial"
        return json_response({
            "message": texts[key].format(accepted=accepted, rejected=rejected),
            "totalCount": len(items), "acceptedCount": accepted, "rejectedCount": rejected,
            "details": details,
        }, 202 if rejected == 0 else 207)

    # --- GET /v1/notifications/{id} ---------------------------------------------------
    async def get(self, request: Request) -> Response:
        try:
            principal = await self._principal(request, None)
        except AuthError as exc:
            return problem(exc.status, exc.message, exc.code)
        nid = request.path_params["notification_id"]
        try:
            nid = str(uuid.UUID(nid))
        except ValueError:
            return problem(404, "Уведомление не найдено", "not_found")
        found = await self.store.get(nid)
        # Another subject's notification is "not found": its existence is not disclosed.
        if found is None or found["subject"]["id"] != principal.user_id:
            return problem(404, "Уведомление не найдено", "not_found")
        return json_response(found)


# --------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------


class DispatchEngine:
    """The outbox loop, independent of Ray (tests run it directly)."""

    def __init__(self, store: NotificationsStore, channels: Mapping[str, Channel],
                 policy: RetryPolicy, *, batch_size: int = 100, flush_interval_s: float = 5.0,
                 lease_s: float = 300.0, tick_s: float = 1.0, recorder: Recorder | None = None
                 ) -> None:
        self.store = store
        self.channels = channels
        self.policy = policy
        self.batch_size = max(1, batch_size)
        self.flush_interval_s = flush_interval_s
        self.lease_s = lease_s
        self.tick_s = min(tick_s, flush_interval_s)
        self.recorder = recorder or Recorder()
        self._wanted: list[str] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.rounds = 0
        self.finished = 0

    def kick(self, ids: Sequence[str]) -> None:
        self._wanted.extend(ids)
        self._wake.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._tasks:
            self._tasks = [loop.create_task(self._urgent_loop()), loop.create_task(self._flush_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def run_round(self, jobs: list[Job]) -> int:
        if not jobs:
            return 0
        t0 = time.perf_counter()
        try:
            results = await dispatch_round(jobs, self.channels, self.policy)
            await self.store.finish_round(results)
        except Exception:
            log.exception("notification round of %d failed; releasing", len(jobs))
            with contextlib.suppress(Exception):
                await self.store.release([j.id for j in jobs])
            return 0
        self.rounds += 1
        rec = self.recorder
        rec.observe("conveyor_notification_round_seconds", time.perf_counter() - t0)
        for r in results:
            for a in r.attempts:
                rec.inc("conveyor_notification_attempts_total", channel=a.channel, status=a.status.value)
            if r.final is not None:
                self.finished += 1
                rec.inc("conveyor_notifications_final_total", state=r.final.value)
            else:
                rec.inc("conveyor_notification_retries_total")
        return len(jobs)

    async def urgent_once(self) -> int:
        """Kicked ids, then due retries and immediate ones whose kick was lost."""
        done = 0
        while self._wanted:
            ids, self._wanted = self._wanted[: self.batch_size], self._wanted[self.batch_size:]
            done += await self.run_round(await self.store.claim_ids(ids, self.lease_s))
        while True:
            jobs = await self.store.claim_urgent(self.batch_size, self.lease_s)
            done += await self.run_round(jobs)
            if len(jobs) < self.batch_size:
                return done

    async def flush_once(self) -> int:
        """Queued notifications, in batches of ``batch_size`` until none is due."""
        done = 0
        while True:
            jobs = await self.store.claim_queued(self.batch_size, self.lease_s)
            done += await self.run_round(jobs)
            if len(jobs) < self.batch_size:
                return done

    async def _urgent_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            self._wake.clear()
            try:
                await self.urgent_once()
            except Exception:
                log.exception("urgent dispatch failed")
                await asyncio.sleep(self.tick_s)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush_once()
            except Exception:
                log.exception("queued flush failed")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, num_replicas=1, max_ongoing_requests=100)
class NotificationDispatcher:
    async def __init__(self, settings: dict[str, Any]) -> None:
        from adapters.postgres import migrate, open_pool, resolve_dsn

        self.settings = s = Settings(**settings)
        dsn = await resolve_dsn(s.database_url, s.data_dir)
        self.pool = await open_pool(dsn, s.db_pool_min, s.db_pool_max)
        await migrate(self.pool)
        self.store = NotificationsStore(self.pool)
        channels, self.raw_channels = build_channels(s)
        self.engine = DispatchEngine(
            self.store, channels,
            RetryPolicy(s.notification_max_attempts, s.notification_retry_base_s,
                        s.notification_retry_max_s),
            batch_size=s.notification_batch_size, flush_interval_s=s.notification_flush_interval_s,
            lease_s=s.notification_lease_s)
        self.metrics: Any = None
        try:
            from cluster.telemetry import MetricsPusher

            self.metrics = MetricsPusher("notifications", s.metrics_push_s)
            self.metrics.recorder = self.engine.recorder
            self.metrics.start()
        except Exception as exc:  # metrics are optional
            log.warning("notification metrics unavailable: %r", exc)
        self.engine.start()

    async def dispatch_now(self, ids: list[str]) -> int:
        """Hand-off of immediate notifications: queued for the engine, returns at once."""
        self.engine.kick(ids)
        return len(ids)

    async def ping(self) -> bool:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
        return True

    async def stats(self) -> dict[str, Any]:
        return {"rounds": self.engine.rounds, "finished": self.engine.finished,
                **await self.store.stats()}

    async def check_health(self) -> None:
        await self.ping()
