"""JWT verification against a JWKS HTTP server the test starts (Keycloak-style RS256)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.auth import AuthError, JwksKeys, JwtVerifier

ISSUER = "http://keycloak.test/realms/conveyor"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Key:
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

    async def jwks(self, request: Request) -> Response:
        self.fetches += 1
        if self.failing:
            return Response("unavailable", 503)
        return JSONResponse({"keys": [k.jwk() for k in self.keys]})


@pytest.fixture
async def jwks() -> AsyncIterator[tuple[JwksServer, str, Key]]:
    key = Key("k1")
    srv = JwksServer([key])
    port = free_port()
    app = Starlette(routes=[Route("/realms/conveyor/protocol/openid-connect/certs", srv.jwks)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn exposes a flag, not an event)
        await asyncio.sleep(0.01)
    yield srv, f"http://127.0.0.1:{port}/realms/conveyor/protocol/openid-connect/certs", key
    server.should_exit = True
    await task


def verifier(url: str, **kw: Any) -> JwtVerifier:
    return JwtVerifier(issuer=ISSUER, audience="conveyor", client_id="conveyor",
                       jwks=JwksKeys(url, cache_s=kw.pop("cache_s", 300), min_refetch_s=0), **kw)


async def refused(v: JwtVerifier, token: str | None) -> AuthError:
    with pytest.raises(AuthError) as info:
        await v.verify(token)
    return info.value


async def test_valid_keycloak_token(jwks: Any) -> None:
    _, url, key = jwks
    p = await verifier(url).verify(key.sign())
    assert (p.user_id, p.name) == ("user-123", "John Doe")
    assert "notifications:send" in p.roles  # from resource_access.conveyor.roles
    p.require("notifications:send")


async def test_subject_falls_back_to_preferred_username(jwks: Any) -> None:
    _, url, key = jwks
    p = await verifier(url).verify(key.sign(sub=None))
    assert p.user_id == "john"


async def test_no_token_and_garbage(jwks: Any) -> None:
    _, url, _ = jwks
    v = verifier(url)
    assert (await refused(v, None)).code == "missing_token"
    assert (await refused(v, "garbage")).status == 401
    assert (await refused(v, "a.b.c")).status == 401


async def test_expired_token(jwks: Any) -> None:
    _, url, key = jwks
    err = await refused(verifier(url), key.sign(exp=int(time.time()) - 3600))
    assert err.code == "token_expired" and err.status == 401


async def test_token_without_expiry_is_refused(jwks: Any) -> None:
    _, url, key = jwks
    assert (await refused(verifier(url), key.sign(exp=None))).status == 401


async def test_wrong_issuer_and_audience(jwks: Any) -> None:
    _, url, key = jwks
    assert "issuer" in (await refused(verifier(url), key.sign(iss="http://evil.test/realms/x"))).message
    assert "audience" in (await refused(verifier(url), key.sign(aud="other", azp="other"))).message


async def test_token_signed_by_another_key_with_the_same_kid(jwks: Any) -> None:
    _, url, _ = jwks
    impostor = Key("k1")
    assert (await refused(verifier(url), impostor.sign())).status == 401


async def test_alg_none_is_refused(jwks: Any) -> None:
    _, url, _ = jwks
    now = int(time.time())
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT", "kid": "k1"}).encode())
    body = base64.urlsafe_b64encode(json.dumps({"sub": "admin", "iss": ISSUER, "azp": "conveyor",
                                                "exp": now + 300}).encode())
    token = header.rstrip(b"=").decode() + "." + body.rstrip(b"=").decode() + "."
    assert (await refused(verifier(url), token)).status == 401


async def test_hs256_signed_with_the_public_key_is_refused(jwks: Any) -> None:
    """The classic key-confusion attack: HMAC keyed with the server's public RSA key."""
    _, url, key = jwks
    import hashlib
    import hmac

    now = int(time.time())

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode()) + "."
                     + b64(json.dumps({"sub": "admin", "iss": ISSUER, "azp": "conveyor",
                                       "exp": now + 300}).encode()))
    sig = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    err = await refused(verifier(url), signing_input + "." + b64(sig))
    assert err.status == 401 and "RS256" in err.message


async def test_unknown_kid_triggers_one_refetch(jwks: Any) -> None:
    srv, url, key = jwks
    v = verifier(url)
    await v.verify(key.sign())
    assert srv.fetches == 1
    rotated = Key("k2")
    srv.keys = [key, rotated]
    await asyncio.sleep(0.6)  # the verifier coalesces refetches within half a second
    p = await v.verify(rotated.sign())
    assert p.user_id == "user-123" and srv.fetches == 2
    await v.verify(key.sign())  # cached again: no fetch
    assert srv.fetches == 2


async def test_last_good_key_set_is_kept_when_refresh_fails(jwks: Any) -> None:
    srv, url, key = jwks
    v = verifier(url, cache_s=0)  # every call wants a refresh
    await v.verify(key.sign())
    srv.failing = True
    await asyncio.sleep(0.6)
    p = await v.verify(key.sign())
    assert p.user_id == "user-123" and srv.fetches >= 2


async def test_jwks_unreachable_from_the_start_is_401() -> None:
    v = verifier(f"http://127.0.0.1:{free_port()}/certs")
    assert (await refused(v, Key("k1").sign())).status == 401


async def test_missing_role_is_403(jwks: Any) -> None:
    _, url, key = jwks
    p = await verifier(url).verify(key.sign(resource_access={"conveyor": {"roles": []}}))
    with pytest.raises(AuthError) as info:
        p.require("notifications:send")
    assert info.value.status == 403


async def test_realm_role_is_enough(jwks: Any) -> None:
    _, url, key = jwks
    p = await verifier(url).verify(key.sign(realm_access={"roles": ["notifications:send"]},
                                            resource_access=None))
    p.require("notifications:send")
