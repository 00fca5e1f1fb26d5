"""HTTP middleware as plain ASGI callables (WebSocket scopes pass through untouched).

``wrap(app, ...)`` stacks them, outermost first:

1. ``AccessLog`` — one JSON log line per request: method, path, status, duration, trace id
   (taken from ``X-Request-Id`` / ``traceparent`` or made up, returned as ``X-Trace-Id``).
2. ``ErrorHandler`` — an exception that escaped the app becomes a 500 in the endpoint's
   error shape (if nothing was sent yet).
3. ``Timeout`` — a request still running after ``timeout_s`` is cancelled and answered 504.
4. ``BodyLimit`` — a body over ``max_bytes`` is answered 413 (by ``Content-Length`` up
   front; a chunked body is read up to the limit before the app runs).
5. ``AllowHeader`` (``deployments.allow``) — a 405 lists every method of the resource.

Error bodies under ``/v1/notifications`` follow that API's contract
(``{"error": "HTTP 504 Gateway Timeout", "message": ...}``); elsewhere the protocol's
``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from http import HTTPStatus
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from deployments.allow import AllowHeader

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("conveyor.access")
log = logging.getLogger("conveyor.http")
NOTIFICATION_PREFIX = "/v1/notifications"
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")

MESSAGES_RU = {
    400: "Некорректный запрос",
    404: "Ресурс не найден",
    405: "Метод не поддерживается",
    413: "Тело запроса слишком велико",
    500: "Внутренняя ошибка сервера",
    504: "Превышено время обработки запроса",
}


def error_body(path: str, status: int, code: str, message: str | None = None) -> bytes:
    phrase = HTTPStatus(status).phrase
    if path.startswith(NOTIFICATION_PREFIX):
        text = message or MESSAGES_RU.get(status, phrase)
        return orjson.dumps({"error": f"HTTP {status} {phrase}", "message": text, "code": code})
    return orjson.dumps({"error": {"code": code, "message": message or phrase}})


async def send_error(send: Send, scope: Scope, status: int, code: str, message: str | None = None
                     ) -> None:
    body = error_body(scope.get("path", ""), status, code, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def trace_id_of(scope: Scope) -> str:
    headers = dict(scope.get("headers") or [])
    rid = headers.get(b"x-request-id")
    if rid and 0 < len(rid) <= 128:
        return rid.decode("latin-1")
    tp = headers.get(b"traceparent")
    if tp:
        m = _TRACEPARENT.match(tp.decode("latin-1").strip())
        if m:
            return m.group(1)
    return uuid.uuid4().hex


class AccessLog:
    def __init__(self, app: ASGIApp, logger: logging.Logger = access_log) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trace = trace_id_of(scope)
        scope.setdefault("state", {})["trace_id"] = trace
        status = 500
        t0 = time.perf_counter()

        async def wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-trace-id", trace.encode())]
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            self.logger.info(orjson.dumps({
                "event": "http_request", "method": scope.get("method"), "path": scope.get("path"),
                "status": status, "durationMs": round((time.perf_counter() - t0) * 1000, 2),
                "traceId": trace,
            }).decode())


class ErrorHandler:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def wrapped(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        except Exception:
            log.exception("unhandled error on %s %s (trace %s)", scope.get("method"),
                          scope.get("path"), scope.get("state", {}).get("trace_id"))
            if not started:
                await send_error(send, scope, 500, "internal")


def app_path(scope: Scope) -> str:
    """The path inside the application: behind a route prefix (``root_path``, e.g.
    ``/local``) the scope's path may carry the prefix too."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return str(path)


class Timeout:
    """504 after ``timeout_s``; paths starting with a key of ``longer`` get that limit
    instead (work that is slow by nature but bounded elsewhere, e.g. checking an upload)."""

    def __init__(self, app: ASGIApp, timeout_s: float,
                 longer: Mapping[str, float] | None = None) -> None:
        self.app = app
        self.default_s = timeout_s
        self.longer = dict(longer or {})

    def limit_for(self, scope: Scope) -> float:
        path = app_path(scope)
        for prefix, limit in self.longer.items():
            if path.startswith(prefix):
                return limit
        return self.default_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout_s = self.limit_for(scope) if scope["type"] == "http" else 0.0
        if timeout_s <= 0:
            await self.app(scope, receive, send)
            return
        started = False

        async def wrapped(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, wrapped), timeout_s)
        except TimeoutError:
            log.warning("timeout after %.1fs on %s %s", timeout_s, scope.get("method"),
                        scope.get("path"))
            if not started:
                await send_error(send, scope, 504, "timeout")


class BodyLimit:
    """413 for a body over ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before anything is read. A
    body without one (chunked) is read up to the limit *before* the app runs: refusing it
    once the app had started reading would surface inside the app (whose own error
    handling answers 500), so the app only ever sees a body known to fit, replayed from
    memory (at most ``max_bytes``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                await send_error(send, scope, 413, "too_large")
                return
            # The server stops the body at its declared length: it fits.
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE") and \
                b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await send_error(send, scope, 413, "too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, replay, send)


class Exempt:
    """Routes ``paths`` starting with one of ``prefixes`` around ``guarded`` to ``app``."""

    def __init__(self, guarded: ASGIApp, app: ASGIApp, prefixes: tuple[str, ...]) -> None:
        self.guarded = guarded
        self.app = app
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = self.app if app_path(scope).startswith(self.prefixes) else self.guarded
        await target(scope, receive, send)


# Object uploads stream large bodies for longer than an API call may take; they have
# their own limit (attachment_max_bytes).
LONG_PATHS = ("/v1/uploads/",)


def wrap(app: ASGIApp, *, timeout_s: float, max_body_bytes: int,
         exempt: tuple[str, ...] = LONG_PATHS, longer: Mapping[str, float] | None = None
         ) -> ASGIApp:
    app = AllowHeader(app, getattr(app, "routes", ()))  # a Starlette app's routes
    guarded = Timeout(BodyLimit(app, max_body_bytes), timeout_s, longer)
    return AccessLog(ErrorHandler(Exempt(guarded, app, exempt) if exempt else guarded))


async def not_found(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for 404/405: the JSON error shapes above."""
    status = getattr(exc, "status_code", 404)
    code = "not_found" if status == 404 else "method_not_allowed"
    return Response(error_body(request.url.path, status, code), status_code=status,
                    media_type="application/json")


async def server_error(request: Request, exc: Exception) -> Response:
    """Starlette's last-resort handler answers plain text; this gives the JSON shape."""
    return Response(error_body(request.url.path, 500, "internal"), status_code=500,
                    media_type="application/json")


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    404: not_found, 405: not_found, Exception: server_error,
}
