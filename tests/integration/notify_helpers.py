"""Helpers shared by the notification integration tests: the API on a Starlette app, a
JWKS server (Keycloak-style RS256 keys), and the gateway's readiness endpoint."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.auth import DevKey, JwtVerifier
from adapters.postgres.notifications import NotificationsStore
from deployments.gateway.health_api import HealthApi
from deployments.middleware import EXCEPTION_HANDLERS, wrap
from deployments.notifications.api import NotificationApi
from deployments.notifications.kick import HandleKick
from serve_app.bootstrap import load_resolver, stage_defaults
from serve_app.openapi import docs_routes
from settings import Settings
from stages.builtin import default_registry
from stages.ports import Ports

ISSUER = "http://keycloak.test/realms/conveyor"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RecordingHandle:
    """Stands in for the dispatcher's deployment handle: records hand-offs."""

    def __init__(self) -> None:
        self.kicked: list[list[str]] = []
        outer = self

        class Method:
            def remote(self, ids: list[str]) -> Any:
                outer.kicked.append(ids)

                async def done() -> int:
                    return len(ids)

                return done()

        class Ping:
            def remote(self) -> Any:
                async def up() -> bool:
                    return True

                return up()

        self.dispatch_now = Method()
        self.ping = Ping()


async def build_api(pool: asyncpg.Pool, data_dir: Path, store: Any = None,
                    verifier: JwtVerifier | None = None, **overrides: Any
                    ) -> tuple[Any, NotificationApi, RecordingHandle, DevKey]:
    """The notification API as the gateway mounts it, wired as the composition root wires
    it (the pipeline of pipelines.yaml, the channels' readiness checks), on the test's
    database, with a recording stand-in for the dispatcher's handle."""
    settings = Settings(data_dir=data_dir, **overrides)
    store = store or NotificationsStore(pool)
    key = DevKey(data_dir)
    if verifier is None:
        verifier = JwtVerifier(issuer="conveyor-dev", audience="conveyor", client_id="conveyor",
                               dev_key=key)
    handle = RecordingHandle()
    registry = default_registry()
    ports = Ports(notification_store=store, notification_dispatch=HandleKick(handle),
                  defaults=stage_defaults(settings))
    pipeline = load_resolver(settings, registry).pipeline("notification", registry, ports)
    api = NotificationApi(settings, store, pipeline, verifier)
    routes = [*api.routes(), *docs_routes(settings),
              *HealthApi(lambda: ready_checks(pool, data_dir, settings, verifier, handle)).routes()]
    app = wrap(Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS),
               timeout_s=settings.request_timeout_s, max_body_bytes=settings.max_request_bytes)
    return app, api, handle, key


def ready_checks(pool: asyncpg.Pool, data_dir: Path, settings: Settings,
                 verifier: JwtVerifier, handle: Any) -> dict[str, Any]:
    """The gateway's readiness checks as the composition root builds them, on the test's
    database and a local object store (the hub is a stand-in that answers)."""
    from adapters.objects import LocalObjectStore
    from adapters.postgres.chats import PostgresChats
    from serve_app.bootstrap import channels

    async def hub_stats() -> list[dict[str, Any]]:
        return []

    (data_dir / "objects").mkdir(parents=True, exist_ok=True)
    _, checks = channels(settings)
    checks.update(database=PostgresChats(pool).ping, hub=hub_stats,
                  objects=LocalObjectStore(data_dir / "objects", "http://api", b"s").ping,
                  notification_dispatcher=lambda: handle.ping.remote())
    if verifier.jwks is not None:
        checks["jwks"] = verifier.jwks.check
    return checks


def token(key: DevKey, user: str = "user-123", roles: list[str] | None = None, ttl_s: int = 600,
          name: str | None = None, issuer: str = "conveyor-dev") -> str:
    return key.issue(user, roles=["notifications:send"] if roles is None else roles, issuer=issuer,
                     audience="conveyor", client_id="conveyor", ttl_s=ttl_s, name=name)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


# --- JWKS -------------------------------------------------------------------------------
class Key:
    """An RSA signing key of the (Keycloak-like) issuer."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, Any]:
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, **over: Any) -> str:
        now = int(time.time())
        claims = {"sub": "user-123", "preferred_username": "john", "name": "John Doe", "iss": ISSUER,
                  "aud": "account", "azp": "conveyor", "iat": now, "exp": now + 300,
                  "realm_access": {"roles": ["offline_access"]},
                  "resource_access": {"conveyor": {"roles": ["notifications:send"]}}}
        claims.update(over)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.private, algorithm="RS256", headers={"kid": self.kid})


class JwksServer:
    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys
        self.fetches = 0
        self.failing = False
        self.gate: asyncio.Event | None = None  # when set: answers wait until it opens

    async def jwks(self, request: Request) -> Response:
        self.fetches += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            return Response("unavailable", 503)
        return JSONResponse({"keys": [k.jwk() for k in self.keys]})


@asynccontextmanager
async def jwks_server() -> AsyncIterator[tuple[JwksServer, str, Key]]:
    """A JWKS endpoint at Keycloak's path on a free port: (server, its URL, the signing key)."""
    key = Key("k1")
    srv = JwksServer([key])
    port = free_port()
    app = Starlette(routes=[Route("/realms/conveyor/protocol/openid-connect/certs", srv.jwks)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn exposes a flag, not an event)
        await asyncio.sleep(0.01)
    try:
        yield srv, f"http://127.0.0.1:{port}/realms/conveyor/protocol/openid-connect/certs", key
    finally:
        server.should_exit = True
        await task
