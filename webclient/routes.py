"""Routes of the web client: the static app, its configuration, and dev sign-in.

- ``GET /app`` redirects to ``/app/`` (the app's modules and API calls are resolved
  relative to it, so the app also works under a route prefix such as ``/tenant/app/``).
- ``GET /app/`` the page; ``GET /app/<file>`` its modules, styles and icons (only files
  shipped in ``webclient/static``).
- ``GET /app/config.json`` how to sign in: ``{"auth": {"mode": "dev"}}``, or ``"oidc"``
  with the issuer's authorization and token endpoints and the client id, or ``"token"``
  (a token must be pasted).
- ``POST /app/dev-token`` ``{"userId": …}`` → ``{"token": …}``: only when a dev-token issuer
  is given (the embedded defaults); 404 otherwise.

Errors are ``{"error": {"code", "message"}}`` with the matching status.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

STATIC = Path(__file__).with_name("static")
USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
OIDC_KEYS = ("issuer", "authorizationEndpoint", "tokenEndpoint", "clientId")


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def _error(status: int, code: str, message: str) -> Response:
    return _json({"error": {"code": code, "message": message}}, status)


def _origin(url: str) -> str | None:
    m = re.match(r"(https?://[^/?#]+)", url)
    return m.group(1) if m else None


def content_security_policy(connect: Sequence[str] = ()) -> str:
    """Everything from the app's own origin; ``connect`` adds origins the page may call
    (the OIDC token endpoint, an object store that takes uploads directly)."""
    extra = " ".join(sorted(set(connect)))
    return ("default-src 'self'; script-src 'self'; style-src 'self'; "
            "img-src 'self' blob: data:; media-src 'self' blob:; font-src 'self'; "
            f"connect-src 'self' {extra}".rstrip() + "; "
            "object-src 'none'; base-uri 'self'; frame-ancestors 'none'; form-action 'self'")


def web_routes(*, dev_token: Callable[[str], str] | None, oidc: dict[str, str] | None,
               connect_origins: Sequence[str] = ()) -> list[BaseRoute]:
    """The web client's routes.

    ``dev_token(user_id) -> JWT`` enables ``POST /app/dev-token`` (give it only while the
    embedded dev key signs tokens). ``oidc``: ``issuer``, ``authorizationEndpoint``,
    ``tokenEndpoint``, ``clientId`` of an OpenID Connect issuer for the authorization code
    flow with PKCE. ``connect_origins``: other origins the page must reach (for example an
    S3 endpoint that takes uploads directly), added to its Content-Security-Policy.
    """
    if oidc is not None:
        missing = [k for k in OIDC_KEYS if not oidc.get(k)]
        if missing:
            raise ValueError(f"oidc needs {', '.join(missing)}")
    if dev_token is not None:
        auth: dict[str, Any] = {"mode": "dev"}
    elif oidc is not None:
        auth = {"mode": "oidc", **{k: oidc[k] for k in OIDC_KEYS}, "scope": "openid"}
    else:
        auth = {"mode": "token"}
    connect = list(connect_origins)
    if oidc is not None and (o := _origin(oidc["tokenEndpoint"])):
        connect.append(o)
    csp = content_security_policy(connect)
    headers = {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
    assets = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*")
              if p.is_file() and p.suffix in MEDIA_TYPES}

    async def redirect(request: Request) -> Response:
        # Relative, so a route prefix in front of the app is kept.
        return RedirectResponse("app/", status_code=308)

    async def asset(request: Request) -> Response:
        name = request.path_params.get("name") or "index.html"
        if name == "dev-token":  # a resource of its own (POST), not a file: 405, not 404
            raise HTTPException(405)
        path = assets.get(name)
        if path is None:
            return _error(404, "not_found", "no such file")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=headers)

    async def config(request: Request) -> Response:
        return _json({"auth": auth})

    async def issue(request: Request) -> Response:
        if dev_token is None:
            return _error(404, "not_found", "dev sign-in is off: tokens come from the issuer")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "invalid", "body is not valid JSON")
        user = body.get("userId") if isinstance(body, dict) else None
        if not isinstance(user, str) or not USER_ID.fullmatch(user):
            return _error(400, "invalid", "'userId' must be 1..64 letters, digits or ._@- "
                                          "(starting with a letter or digit)")
        return _json({"token": dev_token(user), "userId": user})

    return [
        Route("/app", redirect, methods=["GET"]),
        Route("/app/", asset, methods=["GET"]),
        Route("/app/config.json", config, methods=["GET"]),
        Route("/app/dev-token", issue, methods=["POST"]),
        Route("/app/{name:path}", asset, methods=["GET"]),
    ]
