"""405 answers carry ``Allow`` (RFC 9110 §15.5.6), listing every method the resource
supports: a pure ASGI middleware over the application's routes.

Starlette's own 405 names only the first route whose path matched, and Conveyor declares
one route per method (``GET /v1/chats`` and ``POST /v1/chats`` are two routes), so the
union over all routes matching the path is computed here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from starlette.routing import BaseRoute, Match, Route

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def allowed_methods(routes: Sequence[BaseRoute], scope: Scope) -> list[str]:
    """Every method of the routes whose path matches the request's, sorted. A path some
    route names literally (``/app/dev-token``) is that resource alone: the methods of a
    templated route that also matches it (``/app/{name:path}``) are not its methods."""
    literal: set[str] = set()
    templated: set[str] = set()
    for route in routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                (templated if route.param_convertors else literal).update(route.methods)
    return sorted(literal or templated)


class AllowHeader:
    """Adds ``Allow`` to every 405 the app answers (replacing a partial one)."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                allow = ", ".join(allowed_methods(self.routes, scope))
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", allow.encode())]}
            await send(message)

        await self.app(scope, receive, wrapped)
