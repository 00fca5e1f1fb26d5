"""The notification API: ``POST /v1/notifications`` (one object or 1..100) and ``GET
/v1/notifications/{id}``, mounted in the gateway.

A POST runs its items as *one batch* through the ``notification`` pipeline of
``pipelines.yaml`` (validate → persist → route), in-process in the gateway: the stages
are cheap, the gateway already holds a database pool, and a hop to a stage host per
request would cost more than the stages themselves. Immediate notifications are handed
to the dispatcher; if that hand-off is lost, the dispatcher's outbox loop sends them
anyway. An ``Idempotency-Key`` makes a repeat replay the first answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from adapters.auth import AuthError, Principal
from deployments.http import TokenVerifier, json_response
from deployments.notifications.idempotency import valid_idempotency_key
from deployments.notifications.texts import TEXTS, auth_problem, language, problem
from settings import Settings
from stages.model import Envelope, Verdict
from stages.notifications import MAX_ITEMS, AcceptRequest, NotificationApiStore, list_size_issues
from stages.pipeline import Pipeline

log = logging.getLogger("conveyor.notifications")
PREFIX = "/v1/notifications"


def request_hash(raw: bytes) -> str:
    """Same JSON value → same hash, whatever the whitespace or key order."""
    try:
        canonical = orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        canonical = raw
    return hashlib.sha256(canonical).hexdigest()


class NotificationApi:
    def __init__(self, settings: Settings, store: NotificationApiStore, pipeline: Pipeline,
                 verifier: TokenVerifier) -> None:
        self.settings = settings
        self.store = store
        self.pipeline = pipeline
        self.verifier = verifier

    def routes(self) -> list[BaseRoute]:
        return [
            Route(PREFIX, self.post, methods=["POST"]),
            Route(PREFIX + "/{notification_id}", self.get, methods=["GET"]),
        ]

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
        if not valid_idempotency_key(key):
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
        accept = AcceptRequest(items, texts, subject_id=user, key=key, claim=claim)
        accept.envelopes = batch
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
