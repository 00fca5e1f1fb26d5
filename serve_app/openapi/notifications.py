"""The notification API of seed 004 (``/v1/notifications``): its schemas, examples and
responses, in the seed's own error shape (``Problem``)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from deployments.notifications.idempotency import IDEMPOTENCY_KEY_PATTERN
from serve_app.openapi.common import REF, STORABLE, secured
from stages.notifications import (
    EMAIL_PATTERN,
    MAX_BITRIX_ID,
    MAX_CONTACTS,
    MAX_EMAIL_CHARS,
    MAX_ITEMS,
    MAX_MESSAGE_CHARS,
    STRATEGIES,
)

SINGLE_EXAMPLE = {
    "contacts": [{"type": "email", "value": "user@example.com"}],
    "message": "Привет!",
    "isImmediate": False,
    "strategy": "send_to_first_available",
}
FULL_EXAMPLE = {
    "contacts": [{"type": "email", "value": "user@company.com"}, {"type": "bitrix", "value": 12345}],
    "message": "Ваш заказ №12345 готов к выдаче",
    "isImmediate": True,
    "strategy": "send_to_first_available",
}
ARRAY_EXAMPLE: list[dict[str, Any]] = [
    {"contacts": [{"type": "email", "value": "user1@example.com"}], "message": "Привет, user1!",
     "isImmediate": True},
    {"contacts": [{"type": "bitrix", "value": 12345}], "message": "Привет, user2!",
     "strategy": "send_to_all_available"},
]
# Examples of responses are exactly what the server answers to the request examples of
# the same name (ids and timestamps aside); a contract test sends each one and compares.
SUBJECT_EXAMPLE = {"id": "user-123"}


def _accepted(item: dict[str, Any], nid: str) -> dict[str, Any]:
    return {"id": nid, "createdAt": "2025-12-14T12:00:00.000Z", "contacts": item["contacts"],
            "message": item["message"], "isImmediate": item.get("isImmediate", False),
            "strategy": item.get("strategy", STRATEGIES[0]), "subject": SUBJECT_EXAMPLE}


IDS = ["0b3f6c1e-8d2a-4f4b-9a53-1c2d3e4f5a6b", "5c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"]
BAD_ITEM = {"contacts": [], "message": ""}
# Every issue of the item is listed, in order, each exactly {code, message, path}.
BAD_ITEM_ERRORS = [
    {"code": "too_small", "message": "List must contain at least 1 element(s)", "path": ["contacts"]},
    {"code": "too_small", "message": "String must contain at least 1 character(s)", "path": ["message"]},
]
OK_ITEM = {"contacts": [{"type": "email", "value": "ok@ok.com"}], "message": "Hi",
           "isImmediate": True, "strategy": "send_to_first_available"}
OK_BITRIX_ITEM = {"contacts": [{"type": "bitrix", "value": 12345}], "message": "Hi",
                  "isImmediate": False, "strategy": "send_to_all_available"}
PARTIAL_EXAMPLE = [OK_ITEM, OK_BITRIX_ITEM, BAD_ITEM]
MULTI_STATUS_EXAMPLE = {
    "message": "Уведомления приняты частично: 2 принято, 1 отклонено",
    "totalCount": 3, "acceptedCount": 2, "rejectedCount": 1,
    "details": [
        {"status": "success", "notification": _accepted(OK_ITEM, IDS[0])},
        {"status": "success", "notification": _accepted(OK_BITRIX_ITEM, IDS[1])},
        {"status": "failure", "notification": BAD_ITEM, "error": BAD_ITEM_ERRORS},
    ],
}
BAD_REQUEST_EXAMPLE = {
    "error": "HTTP 400 Bad Request",
    "message": "Ни одно уведомление не прошло валидацию",
    "details": [{"item": BAD_ITEM, "error": BAD_ITEM_ERRORS}],
}


def _accepted_all(items: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(items)
    return {"message": f"Все уведомления приняты в обработку: {n} принято", "totalCount": n,
            "acceptedCount": n, "rejectedCount": 0,
            "details": [{"status": "success", "notification": _accepted(item, IDS[i % 2])}
                        for i, item in enumerate(items)]}


REQUEST_EXAMPLES: dict[str, tuple[str, Any]] = {
    "single": ("One notification", SINGLE_EXAMPLE),
    "full": ("Two contacts, immediate", FULL_EXAMPLE),
    "array": ("Array of notifications", ARRAY_EXAMPLE),
    "partial": ("Some valid, one not: 207", PARTIAL_EXAMPLE),
    "invalid": ("None valid: 400", BAD_ITEM),
}
# status → {request example name → response example}
RESPONSE_EXAMPLES: dict[str, dict[str, Any]] = {
    "202": {"single": _accepted_all([SINGLE_EXAMPLE]), "full": _accepted_all([FULL_EXAMPLE]),
            "array": _accepted_all(ARRAY_EXAMPLE)},
    "207": {"partial": MULTI_STATUS_EXAMPLE},
    "400": {"invalid": BAD_REQUEST_EXAMPLE},
}


def _examples(status: str) -> dict[str, Any]:
    return {name: {"summary": f"Answer to the '{name}' request example", "value": value}
            for name, value in RESPONSE_EXAMPLES[status].items()}


def status_line(status: int) -> str:
    """``HTTP 400 Bad Request``: the ``error`` of this API's problems, with the phrase the
    server's own HTTP library gives the status."""
    return f"HTTP {status} {HTTPStatus(status).phrase}"


def _problem(description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": REF + "Problem"}, "example": example}}}


def schemas(settings: Any = None) -> dict[str, Any]:
    """The notification API's schemas; limits follow ``settings`` (defaults without)."""
    max_contacts = getattr(settings, "notification_max_contacts", MAX_CONTACTS)
    max_message = getattr(settings, "notification_max_message_chars", MAX_MESSAGE_CHARS)
    contact_common = {"type": "object", "additionalProperties": False, "required": ["type", "value"]}
    schemas: dict[str, Any] = {
        "EmailContact": {**contact_common, "properties": {
            "type": {"const": "email"},
            "value": {"type": "string", "maxLength": MAX_EMAIL_CHARS, "pattern": EMAIL_PATTERN,
                      "examples": ["user@company.com"],
                      "description": "An e-mail address, exactly as the server checks it."}}},
        "BitrixContact": {**contact_common, "properties": {
            "type": {"const": "bitrix"},
            "value": {"type": "integer", "exclusiveMinimum": 0, "maximum": MAX_BITRIX_ID,
                      "examples": [12345],
                      "description": "Bitrix24 user id."}}},
        "Contact": {
            "description": "A way to reach the recipient.",
            "oneOf": [{"$ref": REF + "EmailContact"}, {"$ref": REF + "BitrixContact"}],
            "discriminator": {"propertyName": "type", "mapping": {
                "email": REF + "EmailContact", "bitrix": REF + "BitrixContact"}},
        },
        "Strategy": {"type": "string", "enum": list(STRATEGIES), "default": STRATEGIES[0],
                     "description": "send_to_first_available: the first working channel, stop on "
                                    "success; send_to_all_available: every working channel."},
        "IncomingNotification": {
            "type": "object", "additionalProperties": False, "required": ["contacts", "message"],
            "description": "One notification for one recipient. `id` and `subject` are set by "
                           "the server and may not be sent.",
            "properties": {
                "contacts": {"type": "array", "minItems": 1, "maxItems": max_contacts,
                             "items": {"$ref": REF + "Contact"}},
                "message": {"type": "string", "minLength": 1, "maxLength": max_message,
                            "pattern": STORABLE, "description": "Any text but U+0000."},
                "isImmediate": {"type": "boolean", "default": False},
                "strategy": {"$ref": REF + "Strategy"},
            },
            "examples": [FULL_EXAMPLE],
        },
        "Subject": {"type": "object", "required": ["id"], "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}}},
        "Notification": {
            "type": "object",
            "required": ["id", "createdAt", "contacts", "message", "isImmediate", "strategy", "subject"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "createdAt": {"type": "string", "format": "date-time"},
                "contacts": {"type": "array", "items": {"$ref": REF + "Contact"}},
                "message": {"type": "string"},
                "isImmediate": {"type": "boolean"},
                "strategy": {"$ref": REF + "Strategy"},
                "subject": {"$ref": REF + "Subject"},
            },
        },
        "ValidationIssue": {
            "type": "object", "required": ["code", "message", "path"], "additionalProperties": False,
            "description": "One problem of an item, exactly as the contract shows it. Every "
                           "problem of the item is listed.",
            "properties": {
                "code": {"type": "string", "enum": ["too_small", "too_big", "invalid_type",
                                                    "invalid_enum_value", "invalid_string",
                                                    "unrecognized_keys", "custom"]},
                "message": {"type": "string"},
                "path": {"type": "array", "items": {"type": ["string", "integer"]}}}},
        "ItemResult": {"oneOf": [
            {"type": "object", "required": ["status", "notification"], "properties": {
                "status": {"const": "success"}, "notification": {"$ref": REF + "Notification"}}},
            {"type": "object", "required": ["status", "notification", "error"], "properties": {
                "status": {"const": "failure"}, "notification": {},
                "error": {"type": "array", "items": {"$ref": REF + "ValidationIssue"}}}},
        ]},
        "AcceptResult": {"type": "object",
                         "required": ["message", "totalCount", "acceptedCount", "rejectedCount", "details"],
                         "properties": {
                             "message": {"type": "string"}, "totalCount": {"type": "integer"},
                             "acceptedCount": {"type": "integer"}, "rejectedCount": {"type": "integer"},
                             "details": {"type": "array", "items": {"$ref": REF + "ItemResult"}}}},
        "Problem": {"type": "object", "required": ["error", "message"], "properties": {
            "error": {"type": "string", "examples": ["HTTP 400 Bad Request"]},
            "message": {"type": "string"}, "code": {"type": "string"},
            "details": {"type": "array", "items": {"type": "object", "properties": {
                "item": {}, "error": {"type": "array", "items": {"$ref": REF + "ValidationIssue"}}}}}}},
        "Attempt": {"type": "object", "properties": {
            "attempt": {"type": "integer"}, "channel": {"type": "string"},
            "status": {"type": "string", "enum": ["delivered", "transient", "permanent", "unavailable"]},
            "detail": {"type": ["string", "null"]}, "durationMs": {"type": "number"},
            "at": {"type": "string", "format": "date-time"}}},
        "NotificationStatus": {"allOf": [{"$ref": REF + "Notification"}, {"type": "object", "properties": {
            "updatedAt": {"type": "string", "format": "date-time"},
            "finishedAt": {"type": ["string", "null"], "format": "date-time"},
            "nextAttemptAt": {"type": ["string", "null"], "format": "date-time",
                              "description": "When the next round is due (null once final)."},
            "state": {"type": "string", "enum": ["accepted", "processing", "delivered",
                                                 "partially_delivered", "failed"]},
            "channels": {"type": "array", "items": {"type": "object", "properties": {
                "contact": {"$ref": REF + "Contact"},
                "status": {"type": "string", "enum": ["pending", "delivered", "failed", "skipped"]},
                "attempts": {"type": "array", "items": {"$ref": REF + "Attempt"}}}}}}}]},
    }
    return schemas


# The first item's status (on 202 only: a 207's first item may be a refused one).
STATUS_LINK = {"status": {"operationId": "getNotification",
                          "parameters": {"id": "$response.body#/details/0/notification/id"},
                          "description": "Delivery state of the first notification."}}


def server_problems() -> dict[str, Any]:
    """500 and 504, in this API's shape."""
    return {
        "500": _problem("Internal error (a dependency failed, e.g. the database or the token "
                        "issuer's keys, code `jwks_unavailable`).",
                        {"error": status_line(500), "code": "internal",
                         "message": "Внутренняя ошибка сервера"}),
        "504": _problem("The request took too long (`request_timeout_s`).",
                        {"error": status_line(504), "code": "timeout",
                         "message": "Превышено время обработки запроса"}),
    }


def paths() -> dict[str, Any]:
    """``/v1/notifications`` and ``/v1/notifications/{id}``."""
    request_schema = {"oneOf": [
        {"$ref": REF + "IncomingNotification"},
        {"type": "array", "minItems": 1, "maxItems": MAX_ITEMS,
         "items": {"$ref": REF + "IncomingNotification"}},
    ]}
    auth_error = _problem("Missing, invalid or expired JWT (messages in Russian; "
                          "`Accept-Language: en` for English).",
                          {"error": status_line(401), "message": "Срок действия токена истёк",
                           "code": "token_expired"})
    return {
        "/v1/notifications": {"post": {
            "operationId": "createNotifications",
            "summary": "Accept one notification or an array of 1..100",
            "security": secured(),
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
                            "description": "Per subject, 24 h: a repeat with the same body gets "
                                           "the same response and sends nothing twice. 1..255 "
                                           "printable ASCII characters, neither first nor last "
                                           "a space (HTTP strips those)."}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": request_schema,
                "examples": {name: {"summary": summary, "value": value}
                             for name, (summary, value) in REQUEST_EXAMPLES.items()},
            }}},
            "responses": {
                "202": {"description": "Every notification is valid and accepted.",
                        "content": {"application/json": {"schema": {"$ref": REF + "AcceptResult"},
                                                         "examples": _examples("202")}},
                        "links": STATUS_LINK},
                "207": {"description": "Some notifications were accepted, some rejected.",
                        "content": {"application/json": {"schema": {"$ref": REF + "AcceptResult"},
                                                         "examples": _examples("207")}}},
                "400": {"description": "No notification passed validation (or the body is not "
                                       "JSON, or the array is empty or longer than 100).",
                        "content": {"application/json": {"schema": {"$ref": REF + "Problem"},
                                                         "examples": _examples("400")}}},
                "401": auth_error,
                "403": _problem("The token lacks the required role.",
                                {"error": status_line(403), "code": "forbidden",
                                 "message": "Требуется роль 'notifications:send'"}),
                "409": _problem("A request with this Idempotency-Key is still in flight.",
                                {"error": status_line(409), "code": "idempotency_key_in_flight",
                                 "message": "Запрос с этим ключом идемпотентности ещё обрабатывается"}),
                "413": _problem("The body is too large (`max_request_bytes`).",
                                {"error": status_line(413), "code": "too_large",
                                 "message": "Тело запроса слишком велико"}),
                "422": _problem("The Idempotency-Key was used with another body.",
                                {"error": status_line(422),
                                 "code": "idempotency_key_reused",
                                 "message": "Ключ идемпотентности уже использован с другим "
                                            "телом запроса"}),
                **server_problems(),
            },
        }},
        "/v1/notifications/{id}": {"get": {
            "operationId": "getNotification",
            "summary": "State and attempts per channel (only for the subject that created it)",
            "security": secured(),
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string", "format": "uuid"}}],
            "responses": {
                "200": {"description": "The notification.", "content": {"application/json": {
                    "schema": {"$ref": REF + "NotificationStatus"}}}},
                "401": auth_error,
                "404": _problem("No such notification for this subject.",
                                {"error": status_line(404), "message": "Уведомление не найдено",
                                 "code": "not_found"}),
                **server_problems(),
            },
        }},
    }
