"""HTTP helpers shared by the gateway's endpoints: JSON responses, errors, auth."""

from __future__ import annotations

import re
from typing import Any, Protocol

import orjson
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from adapters.auth import AuthError, Principal, bearer_token


class TokenVerifier(Protocol):
    """Checks a bearer token: the principal, or ``AuthError`` (401 bad token; 500 the
    issuer's keys cannot be had, retry)."""

    async def verify(self, token: str | None) -> Principal: ...


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_INTEGER = re.compile(r"-?[0-9]{1,20}")


def storable(text: str) -> bool:
    """Whether PostgreSQL can store ``text``: every character but NUL. Input that cannot
    be stored is refused (400, or 404 for an id) instead of failing in the database."""
    return "\x00" not in text


def query_int(request: Request, name: str, default: int) -> int:
    """A query parameter that must be a decimal integer (Python's ``int()`` would also take
    ``" 1"``, ``"1_0"`` or other scripts' digits): ``ApiError`` 400 otherwise."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not _INTEGER.fullmatch(raw):
        raise ApiError(400, "invalid", f"{name} must be an integer")
    return int(raw)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json",
                    headers=headers)


def error_response(status: int, code: str, message: str) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="conveyor"'} if status == 401 else None
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def token_of(conn: HTTPConnection, allow_query: bool = False) -> str | None:
    token = bearer_token(conn.headers.get("authorization"))
    if token is None and allow_query:
        token = conn.query_params.get("access_token")
    return token


async def authenticate(conn: HTTPConnection, verifier: TokenVerifier, allow_query: bool = False
                       ) -> Principal:
    try:
        return await verifier.verify(token_of(conn, allow_query))
    except AuthError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
