"""Helpers shared by the notification integration tests: the API on a Starlette app."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
from starlette.applications import Starlette

from adapters.auth import DevKey, JwtVerifier
from adapters.notifications_store import NotificationsStore
from deployments.middleware import EXCEPTION_HANDLERS, wrap
from deployments.notifications import NotificationApi
from serve_app.bootstrap import load_resolver
from serve_app.settings import Settings
from stages.builtin import default_registry


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

        self.dispatch_now = Method()


async def build_api(pool: asyncpg.Pool, data_dir: Path, store: Any = None, **overrides: Any
                    ) -> tuple[Any, NotificationApi, RecordingHandle, DevKey]:
    settings = Settings(data_dir=data_dir, **overrides)
    store = store or NotificationsStore(pool)
    services = SimpleNamespace(
        pool=pool, extra={"notification_store": store}, registry=default_registry(),
        settings=settings,
    )
    services.resolver = load_resolver(settings, services.registry)
    services.ports = lambda **more: {**services.extra, **more}
    key = DevKey(data_dir)
    verifier = JwtVerifier(issuer="conveyor-dev", audience="conveyor", client_id="conveyor", dev_key=key)
    handle = RecordingHandle()
    api = await NotificationApi.open(settings, services, verifier, dispatcher=handle)
    app = wrap(Starlette(routes=api.routes(), exception_handlers=EXCEPTION_HANDLERS),
               timeout_s=settings.request_timeout_s, max_body_bytes=settings.max_request_bytes)
    return app, api, handle, key


def token(key: DevKey, user: str = "user-123", roles: list[str] | None = None, ttl_s: int = 600,
          name: str | None = None, issuer: str = "conveyor-dev") -> str:
    return key.issue(user, roles=["notifications:send"] if roles is None else roles, issuer=issuer,
                     audience="conveyor", client_id="conveyor", ttl_s=ttl_s, name=name)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
