"""The notification service: its HTTP API (mounted in the gateway) and its dispatcher.

``NotificationApi`` answers ``POST /v1/notifications`` (one object or 1..100), ``GET
/v1/notifications/{id}``, ``/api-docs`` and ``/openapi.json``. A POST runs its items as
*one batch* through the ``notification`` pipeline of ``pipelines.yaml`` (validate →
persist → route), in-process in the gateway: the stages are cheap, the gateway already
holds a database pool, and a hop to a stage host per request would cost more than the
stages themselves. Immediate notifications are handed to ``NotificationDispatcher``;
if that hand-off is lost, the dispatcher's outbox loop sends them anyway.

``NotificationDispatcher`` (a Serve deployment) runs ``DispatchEngine``:
immediate notifications at once, queued ones flushed in batches every
``notification_flush_interval_s``, retries with backoff and jitter, every attempt
recorded, final state stored. A dead process loses nothing: its leases expire and the
outbox rows are claimed again. Several replicas may run: claims are leased, and the
Bitrix24 portal's rate limit is held across them (and the gateways' readiness pings) by
one shared gate (``cluster.ratelimit``).
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
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from adapters.auth import AuthError, JwtVerifier, Principal
from adapters.bitrix import BitrixChannel, local_gate
from adapters.mailfiles import MailDirChannel
from adapters.notifications_store import NotificationsStore
from adapters.smtp import SmtpChannel
from cluster.ratelimit import SharedRateGate
from cluster.telemetry import Recorder
from deployments.http import json_response
from deployments.middleware import error_body
from settings import Settings
from stages.model import Envelope, Verdict
from stages.notifications import (
    MAX_ITEMS,
    AcceptRequest,
    Channel,
    CircuitBreaker,
    DispatchPacer,
    GuardedChannel,
    Job,
    RetryPolicy,
    RoundReport,
    RoundResult,
    SendStatus,
    dispatch_round,
    list_size_issues,
)
from stages.pipeline import Pipeline
from stages.ports import RateGate

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
        "not_found": "Уведомление не найдено",
        # authentication (AuthError.reason)
        "auth.missing": "Требуется JWT-токен в заголовке Authorization: Bearer <JWT>",
        "auth.malformed": "Токен имеет неверный формат",
        "auth.algorithm": "Принимаются только токены, подписанные RS256",
        "auth.unknown_key": "Токен подписан неизвестным ключом",
        "auth.expired": "Срок действия токена истёк",
        "auth.issuer": "Издатель токена не принимается",
        "auth.audience": "Токен выдан для другого получателя (audience)",
        "auth.no_subject": "В токене нет идентификатора субъекта (sub)",
        "auth.invalid": "Недействительный токен",
        "auth.forbidden": "Требуется роль '{role}'",
        "auth.keys_unavailable": "Ключи проверки подписи токенов недоступны, повторите запрос позже",
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
        "not_found": "Notification not found",
        "auth.missing": "A JWT is required in the Authorization: Bearer <JWT> header",
        "auth.malformed": "The token is malformed",
        "auth.algorithm": "Only RS256-signed tokens are accepted",
        "auth.unknown_key": "The token is signed by an unknown key",
        "auth.expired": "The token has expired",
        "auth.issuer": "The token's issuer is not accepted",
        "auth.audience": "The token's audience is not accepted",
        "auth.no_subject": "The token has no subject (sub)",
        "auth.invalid": "The token is invalid",
        "auth.forbidden": "Role '{role}' is required",
        "auth.keys_unavailable": "Token signing keys are unavailable, retry later",
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


def auth_problem(exc: AuthError, lang: str) -> Response:
    """401/403 (and 500 when the signing keys cannot be had) in the request's language."""
    text = TEXTS[lang].get(f"auth.{exc.reason}")
    message = text.format(**exc.params) if text is not None else exc.message
    if exc.status >= 500:
        log.error("authentication unavailable: %s", exc.message)
    return problem(exc.status, message, exc.code)


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


def bitrix_gate(settings: Settings) -> RateGate:
    """The rate gate of the Bitrix channel: cluster-wide (one actor books every process's
    requests) when running on Ray and ``bitrix_shared_limit`` is on, else per process."""
    local = local_gate(settings.bitrix_rate_per_s, settings.bitrix_burst)
    if not settings.bitrix_shared_limit or not ray.is_initialized():
        return local
    return SharedRateGate(settings.bitrix_rate_per_s, settings.bitrix_burst, local)


def build_channels(settings: Settings) -> tuple[dict[str, Channel], dict[str, Any]]:
    """(channels by contact type, each behind a circuit breaker; raw adapters by name).
    The Bitrix channel is paced by :func:`bitrix_gate`."""
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
                                      timeout_s=settings.bitrix_timeout_s,
                                      gate=bitrix_gate(settings))
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
        # Readiness of every dependency of the service (the gateway adds the database).
        health: dict[str, Callable[[], Awaitable[Any]]] = {}
        if "smtp" in raw:
            health["smtp"] = raw["smtp"].ping
        if "mail_dir" in raw:
            health["mail_dir"] = raw["mail_dir"].ping
        if "bitrix" in raw:
            health["bitrix"] = raw["bitrix"].ping
        if verifier.jwks is not None:
            health["jwks"] = verifier.jwks.check
        if dispatcher is not None:
            health["notification_dispatcher"] = lambda: dispatcher.ping.remote()
        return cls(settings, store, pipeline, verifier, health)

    def routes(self) -> list[BaseRoute]:
        from serve_app.openapi import docs_routes

        return [
            Route(PREFIX, self.post, methods=["POST"]),
            Route(PREFIX + "/{notification_id}", self.get, methods=["GET"]),
            *docs_routes(self.settings),
        ]

    def health_checks(self) -> dict[str, Callable[[], Awaitable[Any]]]:
        """Name → a check that raises when that dependency is down (``/health/ready``)."""
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
            return auth_problem(exc, lang)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            return problem(400, texts["content_type"], "unsupported_content_type", details=[])
        raw = await request.body()
        key = request.headers.get("idempotency-key")
        if key is None:
            return (await self._accept(request, principal, raw, lang, None))[0]
        if not 0 < len(key) <= 255 or not key.isprintable():
            return problem(400, texts["key"], "invalid_idempotency_key", details=[])
        user = principal.user_id
        claim = await self.store.idempotency_begin(
            user, key, request_hash(raw), self.settings.idempotency_ttl_s,
            lease_s=max(60.0, self.settings.request_timeout_s * 3))
        if claim.outcome == "conflict":
            return problem(422, texts["conflict"], "idempotency_key_reused")
        if claim.outcome == "in_flight":
            return problem(409, texts["in_flight"], "idempotency_key_in_flight")
        if claim.outcome == "replay":
            assert claim.status is not None and claim.body is not None
            return Response(claim.body, claim.status, media_type="application/json",
                            headers={"Idempotency-Replayed": "true"})
        held = (user, key, claim.claim)
        try:
            response, persisted = await self._accept(request, principal, raw, lang, held)
        except BaseException:
            # Releases the key only while it is still in flight: once the notifications were
            # committed the key holds their response (same transaction), and a repeat
            # replays it even though this request failed or was cancelled (504).
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.idempotency_release(user, key, claim.claim))
            raise
        if persisted:
            return response
        # Nothing was stored (every item invalid, body not JSON): remember the answer, or
        # free the key for a retry if that cannot be done.
        try:
            if response.status_code >= 500 or not await self.store.idempotency_finish(
                    user, key, response.status_code, bytes(response.body), claim.claim):
                await self.store.idempotency_release(user, key, claim.claim)
        except Exception as exc:
            log.warning("idempotency key %r of %s not recorded: %r", key, user, exc)
        return response

    async def _accept(self, request: Request, principal: Principal, raw: bytes, lang: str,
                      held: tuple[str, str, str | None] | None) -> tuple[Response, bool]:
        """(the response, whether notifications were stored — with the key's response
        when ``held`` names an idempotency claim)."""
        texts = TEXTS[lang]
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return problem(400, texts["json"], "invalid_json", details=[]), False
        if isinstance(body, list):
            issues = list_size_issues(body, [], 1, MAX_ITEMS)
            if issues:
                item = body if not body else None  # a 101-item echo helps nobody
                return json_response({"error": "HTTP 400 Bad Request", "message": texts["none"],
                                      "details": [{"item": item, "error": issues}]}, 400), False
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
        user, key, claim = held if held is not None else (None, None, None)
        accept = AcceptRequest(lambda: acceptance(items, batch, texts), subject_id=user, key=key,
                               claim=claim)
        for env in batch:
            env.meta["request"] = accept
        outcomes = await self.pipeline.run(batch)
        for outcome in outcomes:
            if outcome.verdict is Verdict.REJECT and not outcome.envelope.meta.get("errors"):
                # A stage other than validation refused an item: say so in the item's error.
                outcome.envelope.meta["errors"] = [
                    {"code": "custom", "message": outcome.message or "", "path": []}]
            n = outcome.envelope.meta.get("notification")
            if outcome.verdict is not Verdict.REJECT and n is not None:
                log.info("notification %s accepted (%s) trace %s", n["id"],
                         outcome.envelope.meta.get("route"), trace,
                         extra={"trace_id": n["id"], "request_trace_id": trace})
        status, payload = accept.response()
        return Response(payload, status, media_type="application/json"), accept.persisted

    # --- GET /v1/notifications/{id} ---------------------------------------------------
    async def get(self, request: Request) -> Response:
        lang = language(request)
        try:
            principal = await self._principal(request, None)
        except AuthError as exc:
            return auth_problem(exc, lang)
        nid = request.path_params["notification_id"]
        try:
            nid = str(uuid.UUID(nid))
        except ValueError:
            return problem(404, TEXTS[lang]["not_found"], "not_found")
        found = await self.store.get(nid)
        # Another subject's notification is "not found": its existence is not disclosed.
        if found is None or found["subject"]["id"] != principal.user_id:
            return problem(404, TEXTS[lang]["not_found"], "not_found")
        return json_response(found)


def acceptance(items: Sequence[Any], batch: Sequence[Envelope], texts: Mapping[str, str]
               ) -> tuple[int, bytes]:
    """The response to a POST whose items were validated: 202, 207 or 400 in the seed's
    shapes. An item is accepted when validation gave it its server fields."""
    details: list[dict[str, Any]] = []
    accepted = 0
    for item, env in zip(items, batch, strict=True):
        errors = env.meta.get("errors")
        n = env.meta.get("notification")
        if n is not None and not errors:
            accepted += 1
            details.append({"status": "success", "notification": n})
        else:
            details.append({"status": "failure", "notification": item, "error": errors or [
                {"code": "custom", "message": "rejected", "path": []}]})
    rejected = len(items) - accepted
    if accepted == 0:
        return 400, orjson.dumps({
            "error": "HTTP 400 Bad Request", "message": texts["none"],
            "details": [{"item": d["notification"], "error": d["error"]} for d in details],
        })
    key = "all" if rejected == 0 else "partial"
    return 202 if rejected == 0 else 207, orjson.dumps({
        "message": texts[key].format(accepted=accepted, rejected=rejected),
        "totalCount": len(items), "acceptedCount": accepted, "rejectedCount": rejected,
        "details": details,
    })


# --------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------


class DispatchEngine:
    """The outbox loops, independent of Ray (tests run them directly).

    Two loops: *urgent* (kicked ids, immediate notifications whose kick was lost, due
    retries) wakes on a kick or every ``tick_s``; *flush* sends queued notifications every
    ``flush_interval_s``. Each loop is paced by its own ``DispatchPacer`` (the feedback
    loop): slow or failing rounds shrink its batch and lengthen its interval, every channel
    down pauses it, and it recovers by itself. The flush loop also purges expired
    idempotency keys every ``purge_interval_s``.
    """

    def __init__(self, store: NotificationsStore, channels: Mapping[str, Channel],
                 policy: RetryPolicy, *, batch_size: int = 100, flush_interval_s: float = 5.0,
                 lease_s: float = 300.0, tick_s: float = 1.0, recorder: Recorder | None = None,
                 round_target_s: float = 10.0, purge_interval_s: float = 300.0) -> None:
        self.store = store
        self.channels = channels
        self.policy = policy
        self.batch_size = max(1, batch_size)
        self.flush_interval_s = flush_interval_s
        self.lease_s = lease_s
        self.tick_s = min(tick_s, flush_interval_s)
        self.recorder = recorder or Recorder()
        self.urgent_pace = DispatchPacer(self.batch_size, self.tick_s, target_latency_s=round_target_s)
        self.flush_pace = DispatchPacer(self.batch_size, flush_interval_s,
                                        target_latency_s=round_target_s)
        self.purge_interval_s = purge_interval_s
        self._purged_at: float | None = None
        self._wanted: list[str] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.rounds = 0
        self.finished = 0
        self.purged = 0

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

    def channels_down(self) -> bool:
        """Every configured channel is not working now (breakers open)."""
        return bool(self.channels) and not any(ch.available() for ch in self.channels.values())

    async def run_round(self, jobs: list[Job], pace: DispatchPacer | None = None) -> int:
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
            if pace is not None:
                pace.observe(RoundReport(time.perf_counter() - t0, error=True,
                                         channels_down=self.channels_down()))
            return 0
        took = time.perf_counter() - t0
        self.rounds += 1
        rec = self.recorder
        rec.observe("conveyor_notification_round_seconds", took)
        tried = failed = 0
        for r in results:
            for a in r.attempts:
                tried += 1
                failed += a.status in (SendStatus.TRANSIENT, SendStatus.UNAVAILABLE)
                rec.inc("conveyor_notification_attempts_total", channel=a.channel, status=a.status.value)
            if r.final is not None:
                self.finished += 1
                rec.inc("conveyor_notifications_final_total", state=r.final.value)
            else:
                rec.inc("conveyor_notification_retries_total")
            log_round_result(r)
        if pace is not None:
            pace.observe(RoundReport(took, tried, failed, self.channels_down()))
        return len(jobs)

    async def urgent_once(self) -> int:
        """Kicked ids, then due retries and immediate ones whose kick was lost, in batches
        of the pacer's size; stops early when the pacer is no longer at full pace."""
        pace = self.urgent_pace
        done = 0
        while self._wanted:
            n = pace.batch
            ids, self._wanted = self._wanted[:n], self._wanted[n:]
            done += await self.run_round(await self.store.claim_ids(ids, self.lease_s), pace)
        while True:
            n = pace.batch
            jobs = await self.store.claim_urgent(n, self.lease_s)
            done += await self.run_round(jobs, pace)
            if len(jobs) < n or pace.state != "normal":
                return done

    async def flush_once(self) -> int:
        """Queued notifications, in batches of the pacer's size until none is due (or the
        pacer slows down: the rest waits for the next flush)."""
        pace = self.flush_pace
        done = 0
        while True:
            n = pace.batch
            jobs = await self.store.claim_queued(n, self.lease_s)
            done += await self.run_round(jobs, pace)
            if len(jobs) < n or pace.state != "normal":
                return done

    async def purge_once(self) -> int:
        """Expired idempotency keys removed now."""
        removed = await self.store.purge_expired()
        self._purged_at = time.monotonic()
        self.purged += removed
        if removed:
            log.info("purged %d expired idempotency keys", removed)
        return removed

    async def _paced(self, pace: DispatchPacer, work: Callable[[], Awaitable[int]]) -> None:
        """One tick of a loop: pause while every channel is down, else run ``work``; an
        idle tick counts as a healthy round (the pace recovers when the work is done)."""
        if pace.paused and self.channels_down():
            pace.observe(RoundReport(0.0, channels_down=True))
            self._wanted.clear()  # immediate ones are claimed by the urgent loop anyway
            return
        try:
            if await work() == 0:
                pace.observe(RoundReport(0.0, channels_down=self.channels_down()))
        except Exception:
            log.exception("notification dispatch tick failed")
            pace.observe(RoundReport(0.0, error=True))

    async def _urgent_loop(self) -> None:
        pace = self.urgent_pace
        while True:
            t0 = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pace.interval_s)
            if pace.state != "normal":  # slowed down: a kick does not cut the interval short
                rest = pace.interval_s - (time.monotonic() - t0)
                if rest > 0:
                    await asyncio.sleep(rest)
            self._wake.clear()
            await self._paced(pace, self.urgent_once)

    async def _flush_loop(self) -> None:
        pace = self.flush_pace
        while True:
            if self._purged_at is None or time.monotonic() - self._purged_at >= self.purge_interval_s:
                try:
                    await self.purge_once()
                except Exception:
                    log.exception("purging expired idempotency keys failed")
                    self._purged_at = time.monotonic()
            await asyncio.sleep(pace.interval_s)
            await self._paced(pace, self.flush_once)

    def pace(self) -> dict[str, Any]:
        return {name: {"state": p.state, "batch": p.batch, "intervalS": p.interval_s}
                for name, p in (("urgent", self.urgent_pace), ("flush", self.flush_pace))}


def log_round_result(r: RoundResult) -> None:
    """One JSON line per dispatch attempt (and per outcome), the notification id as trace id."""
    for a in r.attempts:
        log.info(orjson.dumps({
            "event": "notification_attempt", "traceId": a.notification_id,
            "contact": a.contact_index, "channel": a.channel, "attempt": a.attempt,
            "status": a.status.value, "detail": a.detail, "durationMs": round(a.duration_s * 1000, 1),
        }).decode(), extra={"trace_id": a.notification_id})
    outcome: dict[str, Any] = {"event": "notification_round", "traceId": r.job.id,
                               "round": r.job.round}
    if r.final is not None:
        outcome["state"] = r.final.value
    else:
        outcome["retryInS"] = round(r.retry_in_s, 3)
    log.info(orjson.dumps(outcome).decode(), extra={"trace_id": r.job.id})


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
            lease_s=s.notification_lease_s, round_target_s=s.notification_round_target_s,
            purge_interval_s=s.idempotency_purge_interval_s)
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
                "pace": self.engine.pace(), **await self.store.stats()}

    async def check_health(self) -> None:
        await self.ping()
