"""The OpenAPI 3.1 document of every HTTP endpoint the gateway serves, put together from
one module per API area."""

from __future__ import annotations

from typing import Any

from serve_app.openapi import attachments, messenger, notifications, service
from serve_app.openapi.common import ERROR, ERROR_SCHEMA, SECURITY_SCHEMES

DESCRIPTION = """\
Conveyor's HTTP API: the messenger's chats, history, presence and attachments, the
notification service of seed 004, health, metrics and the web client. The WebSocket
protocol (`GET /v1/ws`) is described in AsyncAPI 3.0 at `/asyncapi.json`.

**Authentication.** Operations with `bearerAuth` need `Authorization: Bearer <JWT>` (the
user is the token's `sub`); `POST /v1/notifications` also needs the role
`notifications_role`. `POST /v1/storage/events` takes the storage webhook's shared secret
as its bearer token. `PUT`/`GET /v1/uploads/{key}` are authorized by the signature in
their query. Everything else is public.

**Error shapes.** Two, by path:

- `/v1/notifications` and below (seed 004): `{"error": "HTTP 400 Bad Request",
  "message": "…", "code": "…"}` (schema `Problem`; messages in Russian, English with
  `Accept-Language: en`; a 400 of validation adds `details`);
- every other path: `{"error": {"code": "…", "message": "…"}}` (schema `Error`;
  `/v1/attachments/{attachmentId}/complete` adds `attachmentId` and `state` when the check
  ran, schema `AttachmentRefusal`).

Unknown paths answer 404 and unsupported methods 405 with an `Allow` header, in the
shape of their path. Any operation may answer 500 (internal) or 504 (`request_timeout_s`),
and one that takes a body 413 (`max_request_bytes`).
"""
TAGS = [
    {"name": "chats", "description": "Chats and their history."},
    {"name": "presence", "description": "Who is online."},
    {"name": "attachments", "description": "Files posted to chats (phase 2 of an attachment)."},
    {"name": "uploads", "description": "The embedded object store (no `s3_endpoint`)."},
    {"name": "notifications", "description": "The notification API of seed 004."},
    {"name": "health", "description": "Liveness, readiness, metrics."},
    {"name": "contracts", "description": "This document, the AsyncAPI one, Swagger UI."},
    {"name": "web client", "description": "The browser app at `/app`."},
]


def document(settings: Any = None) -> dict[str, Any]:
    """The whole document; limits follow ``settings`` (defaults without)."""
    schemas: dict[str, Any] = {ERROR: ERROR_SCHEMA, **messenger.SCHEMAS, **attachments.SCHEMAS,
                               **notifications.schemas(settings), **service.SCHEMAS}
    notification_paths = notifications.paths()
    for item in notification_paths.values():
        for operation in item.values():
            operation.setdefault("tags", ["notifications"])
    paths = {**messenger.paths(), **attachments.paths(), **notification_paths,
             **service.paths()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Conveyor", "version": "1.0.0", "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "tags": TAGS,
        "components": {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES},
        "paths": paths,
    }
