"""The service's own endpoints: health, metrics, its contracts (this document, the
AsyncAPI one, Swagger UI) and the web client (``/app``)."""

from __future__ import annotations

from typing import Any

from serve_app.openapi.common import STORABLE, common, error_response, json_content, ok, ref

SCHEMAS: dict[str, Any] = {
    "Live": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "Readiness": {
        "type": "object", "required": ["status", "checks"], "properties": {
            "status": {"enum": ["ready", "unavailable"]},
            "checks": {"type": "object", "description": "One entry per dependency.",
                       "additionalProperties": {
                           "type": "object", "required": ["status"], "properties": {
                               "status": {"enum": ["up", "down", "degraded"]},
                               "latencyMs": {"type": "number"},
                               "error": {"type": "string"}}}}}},
    "WebConfig": {"type": "object", "required": ["auth"], "properties": {"auth": {
        "type": "object", "required": ["mode"], "properties": {
            "mode": {"enum": ["dev", "oidc", "token"]},
            "issuer": {"type": "string"}, "clientId": {"type": "string"},
            "authorizationEndpoint": {"type": "string"}, "tokenEndpoint": {"type": "string"},
            "scope": {"type": "string"}}}}},
    "DevTokenRequest": {"type": "object", "required": ["userId"], "properties": {
        "userId": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"}}},
    "DevToken": {"type": "object", "required": ["token", "userId"], "properties": {
        "token": {"type": "string"}, "userId": {"type": "string"}}},
}

def _document(summary: str, operation_id: str) -> dict[str, Any]:
    return {"get": {"operationId": operation_id, "tags": ["contracts"], "summary": summary,
                    "responses": {"200": ok("The document.", {"type": "object"}), **common()}}}


def _html(summary: str, operation_id: str, tag: str) -> dict[str, Any]:
    return {"get": {"operationId": operation_id, "tags": [tag], "summary": summary,
                    "responses": {"200": {"description": "The page.",
                                          "content": {"text/html": {"schema": {"type": "string"}}}},
                                  **common()}}}


def paths() -> dict[str, Any]:
    no_file = error_response("No such file.", ("not_found", "no such file"))
    return {
        "/health/live": {"get": {
            "operationId": "live", "tags": ["health"], "summary": "Liveness",
            "responses": {"200": ok("The process answers.", ref("Live"), {"status": "ok"}),
                          **common()}}},
        "/health/ready": {"get": {
            "operationId": "ready", "tags": ["health"],
            "summary": "Readiness of every dependency (each checked with a 5 s bound)",
            "responses": {
                "200": ok("Every dependency is up (soft ones may be `degraded`).",
                          ref("Readiness")),
                "503": ok("A dependency is down.", ref("Readiness")), **common()}}},
        "/metrics": {"get": {
            "operationId": "metrics", "tags": ["health"], "summary": "Prometheus text format",
            "responses": {"200": {"description": "Every process's series.", "content": {
                "text/plain": {"schema": {"type": "string"}}}}, **common()}}},
        "/openapi.json": _document("This document (OpenAPI 3.1)", "openapi"),
        "/asyncapi.json": _document("The WebSocket protocol (AsyncAPI 3.0)", "asyncapi"),
        "/api-docs": _html("Swagger UI (served locally)", "apiDocs", "contracts"),
        "/api-docs/{name}": {"get": {
            "operationId": "apiDocsAsset", "tags": ["contracts"],
            "summary": "Swagger UI's files",
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^[^/]+$"}}],
            "responses": {"200": {"description": "The file.", "content": {
                "*/*": {"schema": {"type": "string", "format": "binary"}}}},
                "404": error_response("No such file.", ("not_found", "no such asset")),
                **common()}}},
        "/app": {"get": {
            "operationId": "webClientRedirect", "tags": ["web client"],
            "summary": "Redirects to `app/` (relative, so a route prefix is kept)",
            "responses": {"308": {"description": "To `app/`.", "headers": {
                "Location": {"required": True, "schema": {"const": "app/"}}}}, **common()}}},
        "/app/": _html("The web client", "webClient", "web client"),
        "/app/config.json": {"get": {
            "operationId": "webClientConfig", "tags": ["web client"],
            "summary": "How the web client signs in",
            "responses": {"200": ok("`dev` (a dev token per user name), `oidc` (authorization "
                                    "code + PKCE at the issuer) or `token` (paste one).",
                                    ref("WebConfig"), {"auth": {"mode": "dev"}}), **common()}}},
        "/app/dev-token": {"post": {
            "operationId": "devToken", "tags": ["web client"],
            "summary": "A dev token for a user name (only while the dev key signs tokens)",
            "requestBody": {"required": True, "content": json_content(
                ref("DevTokenRequest"), {"userId": "alice"})},
            "responses": {
                "200": ok("A token with the default roles.", ref("DevToken")),
                "400": error_response("Not JSON, or not a valid user name.", (
                    "invalid", "'userId' must be 1..64 letters, digits or ._@- (starting "
                               "with a letter or digit)")),
                "404": error_response("Dev sign-in is off (a JWKS issuer signs tokens).", (
                    "not_found", "dev sign-in is off: tokens come from the issuer")),
                **common(body=True)}}},
        "/app/{name}": {"get": {
            "operationId": "webClientFile", "tags": ["web client"],
            "summary": "The web client's modules, styles and icons",
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "description": "A file shipped with the client (may contain `/`).",
                            "schema": {"type": "string", "minLength": 1, "pattern": STORABLE}}],
            "responses": {"200": {"description": "The file.", "content": {
                "*/*": {"schema": {"type": "string", "format": "binary"}}}},
                "404": no_file, **common()}}},
    }
