"""The web client's wiring: what ``webclient.web_routes`` is handed, from settings."""

from __future__ import annotations

from starlette.routing import BaseRoute

from adapters.auth import DevKey
from serve_app.cli import DEFAULT_ROLES
from settings import Settings
from webclient import web_routes


def web_client_routes(settings: Settings, dev_key: DevKey | None) -> list[BaseRoute]:
    """``/app`` routes: dev sign-in while the dev key signs tokens (as ``conveyor token``
    does, with the default roles); Keycloak-style OIDC endpoints when a JWKS URL and an
    issuer URL are set; the S3 endpoint, when uploads go there, may be called by the page."""

    def dev_token(user_id: str) -> str:
        assert dev_key is not None
        return dev_key.issue(user_id, roles=DEFAULT_ROLES, issuer=settings.jwt_issuer,
                             audience=settings.jwt_audience, client_id=settings.jwt_client_id,
                             ttl_s=settings.dev_token_ttl_s)

    issuer = settings.jwt_issuer.rstrip("/")
    oidc = None
    if settings.jwks_url and issuer.startswith(("https://", "http://")):
        oidc = {"issuer": issuer, "clientId": settings.jwt_client_id,
                "authorizationEndpoint": f"{issuer}/protocol/openid-connect/auth",
                "tokenEndpoint": f"{issuer}/protocol/openid-connect/token"}
    s3 = (f"{'https' if settings.s3_secure else 'http'}://{settings.s3_endpoint}"
          if settings.s3_endpoint else None)
    return web_routes(dev_token=dev_token if dev_key is not None else None, oidc=oidc,
                      connect_origins=[s3] if s3 else [])
