"""The notification API's words (Russian by default, English on request) and its error
shapes, as seed 004 has them."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from adapters.auth import AuthError
from deployments.http import json_response
from deployments.middleware import error_body

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
        "key": "Idempotency-Key должен содержать от 1 до 255 печатных символов ASCII",
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
        "key": "Idempotency-Key must be 1..255 printable ASCII characters",
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
