"""Pieces every part of the OpenAPI document shares: the two error shapes, the responses
the middleware may give on any operation, and the security schemes.

Two error shapes, by path (PROTOCOL.md, "HTTP"):

- under ``/v1/notifications`` the seed-004 shape ``{"error": "HTTP 400 Bad Request",
  "message", "code", "details"?}`` (:data:`NOTIFICATION_PROBLEM`);
- everywhere else ``{"error": {"code", "message"}}`` (:data:`ERROR`).

The middleware (``deployments.middleware``) answers 404, 405, 413, 500 and 504 in the
shape of the path it refuses.
"""

from __future__ import annotations

from typing import Any

REF = "#/components/schemas/"
ERROR = "Error"
NOTIFICATION_PROBLEM = "Problem"
BEARER = "bearerAuth"
STORAGE_WEBHOOK = "storageWebhook"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "description": "The error shape of every path except `/v1/notifications*`.",
    "properties": {"error": {
        "type": "object", "required": ["code", "message"], "additionalProperties": False,
        "properties": {"code": {"type": "string", "description": "Stable, machine-readable."},
                       "message": {"type": "string", "description": "For people (English)."}}}},
}
SECURITY_SCHEMES: dict[str, Any] = {
    BEARER: {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
             "description": "RS256 JWT from the issuer (`jwks_url`) or, with the embedded "
                            "defaults, from `conveyor token USER`. The user id is `sub`."},
    STORAGE_WEBHOOK: {"type": "http", "scheme": "bearer",
                      "description": "The shared secret `storage_webhook_secret` the object "
                                     "store sends with its bucket notifications."},
}
WWW_AUTHENTICATE = {"WWW-Authenticate": {
    "description": "`Bearer realm=\"conveyor\"`", "schema": {"type": "string"}}}
ALLOW = {"Allow": {"description": "The methods the resource supports (RFC 9110).",
                   "required": True, "schema": {"type": "string"}}}


def error(code: str, message: str) -> dict[str, Any]:
    """An ``Error`` body, as the server writes it."""
    return {"error": {"code": code, "message": message}}


def error_response(description: str, *examples: tuple[str, str],
                   headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A response in the ``{"error": {"code", "message"}}`` shape; ``examples`` are
    (code, message) pairs the server really answers with."""
    content: dict[str, Any] = {"schema": {"$ref": REF + ERROR}}
    if len(examples) == 1:
        content["example"] = error(*examples[0])
    elif examples:
        content["examples"] = {code: {"value": error(code, message)} for code, message in examples}
    out: dict[str, Any] = {"description": description, "content": {"application/json": content}}
    if headers:
        out["headers"] = headers
    return out


def unauthorized(example: tuple[str, str] = ("missing_token", "a bearer token is required")
                 ) -> dict[str, Any]:
    return error_response("Missing, invalid or expired bearer token.", example,
                          headers=WWW_AUTHENTICATE)


# What the middleware may answer on any operation of the error shape ``Error``.
SERVER_ERROR = error_response(
    "Internal error: an exception, a dependency down, or the issuer's keys unreachable "
    "(`jwks_unavailable`, retry later).", ("internal", "Internal Server Error"))
TIMEOUT = error_response("The request took longer than `request_timeout_s`.",
                         ("timeout", "Gateway Timeout"))
TOO_LARGE = error_response("The body is larger than `max_request_bytes`.",
                           ("too_large", "Request Entity Too Large"))


def common(*, body: bool = False) -> dict[str, Any]:
    """Responses any operation may give (500, 504; 413 when it takes a body)."""
    out = {"500": SERVER_ERROR, "504": TIMEOUT}
    if body:
        out["413"] = TOO_LARGE
    return out


def json_content(schema: dict[str, Any], example: Any = None,
                 examples: dict[str, Any] | None = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    if examples:
        media["examples"] = {name: {"value": value} for name, value in examples.items()}
    return {"application/json": media}


def ok(description: str, schema: dict[str, Any], example: Any = None,
       headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": json_content(schema, example)}
    if headers:
        out["headers"] = headers
    return out


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def secured(scheme: str = BEARER) -> list[dict[str, list[str]]]:
    return [{scheme: []}]


# Strings PostgreSQL can store: every character but NUL.
STORABLE = "^[^\\u0000]*$"
