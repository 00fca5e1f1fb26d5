"""JWT authentication: RS256 tokens verified against a JWKS (Keycloak) or the dev key.

Guarantees: only RS256 is accepted (``alg: none`` and HS256 are refused whatever key they
name); ``exp`` is required; issuer and audience (``aud`` or ``azp``) are checked when
configured. JWKS are fetched without blocking the event loop, cached, the last good key set
is kept when a refresh fails, and an unknown ``kid`` triggers at most one refetch per
``min_refetch_s``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ALGORITHMS = ["RS256"]
DEV_KID = "conveyor-dev"


class AuthError(Exception):
    """A token was missing, malformed, badly signed, expired or lacks a role."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Principal:
    user_id: str
    name: str | None
    roles: frozenset[str]
    claims: dict[str, Any] = field(default_factory=dict, compare=False)

    def require(self, role: str | None) -> None:
        if role and role not in self.roles:
            raise AuthError("forbidden", f"role '{role}' is required", status=403)


def roles_of(claims: dict[str, Any], client_id: str) -> frozenset[str]:
    roles: set[str] = set()
    realm = claims.get("realm_access")
    if isinstance(realm, dict):
        roles.update(r for r in realm.get("roles", []) if isinstance(r, str))
    res = claims.get("resource_access")
    if isinstance(res, dict) and isinstance(res.get(client_id), dict):
        roles.update(r for r in res[client_id].get("roles", []) if isinstance(r, str))
    return frozenset(roles)


class DevKey:
    """The embedded default's signing key, created on first use under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        path = data_dir / "dev-jwt-key.pem"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(pem)
            tmp.chmod(0o600)
            try:
                # Two processes may race to create it: the first link wins, both read it.
                path.hardlink_to(tmp)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        self._private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        self.public_key = self._private.public_key()

    def issue(
        self,
        user_id: str,
        *,
        roles: list[str],
        issuer: str,
        audience: str | None,
        client_id: str,
        ttl_s: int,
        name: str | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": user_id,
            "preferred_username": user_id,
            "iss": issuer,
            "iat": now,
            "exp": now + ttl_s,
            "azp": client_id,
            "realm_access": {"roles": roles},
        }
        if audience:
            claims["aud"] = audience
        if name:
            claims["name"] = name
        return jwt.encode(claims, self._private, algorithm="RS256", headers={"kid": DEV_KID})  # type: ignore[arg-type]


class JwksKeys:
    """Keys from a JWKS URL, fetched off the event loop and cached."""

    def __init__(self, url: str, cache_s: float = 300.0, min_refetch_s: float = 10.0) -> None:
        self.url = url
        self.cache_s = cache_s
        self.min_refetch_s = min_refetch_s
        self._keys: dict[str, Any] = {}
        self._fetched_at = 0.0
        self._attempted_at = 0.0
        self._lock = asyncio.Lock()

    async def _refresh(self) -> None:
        self._attempted_at = time.monotonic()
        async with httpx.AsyncClient(timeout=5.0) as client:
            resp = await client.get(self.url)
            resp.raise_for_status()
            data = resp.json()
        keys: dict[str, Any] = {}
        for jwk in data.get("keys", []):
            if jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
                continue
            try:
                keys[jwk.get("kid", "")] = jwt.PyJWK.from_dict(jwk, algorithm="RS256").key
            except jwt.PyJWTError:
                continue
        self._keys = keys
        self._fetched_at = time.monotonic()

    async def ready(self) -> bool:
        try:
            await self.get(None)
            return True
        except AuthError:
            return False

    async def get(self, kid: str | None) -> Any:
        now = time.monotonic()
        stale = now - self._fetched_at > self.cache_s
        unknown = kid is not None and kid not in self._keys
        if stale or (unknown and now - self._attempted_at > self.min_refetch_s) or not self._keys:
            async with self._lock:
                if time.monotonic() - self._attempted_at > 0.5 or not self._keys:
                    try:
                        await self._refresh()
                    except (httpx.HTTPError, ValueError):
                        # Keep serving with the last good key set.
                        if not self._keys:
                            raise AuthError("jwks_unavailable", "signing keys are unavailable") from None
        if kid is None:
            if len(self._keys) == 1:
                return next(iter(self._keys.values()))
            return None
        if kid not in self._keys:
            raise AuthError("invalid_token", "token signed by an unknown key")
        return self._keys[kid]


class JwtVerifier:
    def __init__(
        self,
        *,
        issuer: str | None,
        audience: str | None,
        client_id: str,
        leeway_s: float = 10.0,
        dev_key: DevKey | None = None,
        jwks: JwksKeys | None = None,
    ) -> None:
        if (dev_key is None) == (jwks is None):
            raise ValueError("exactly one of dev_key and jwks is needed")
        self.issuer = issuer
        self.audience = audience
        self.client_id = client_id
        self.leeway_s = leeway_s
        self.dev_key = dev_key
        self.jwks = jwks

    @classmethod
    def from_settings(cls, settings: Any) -> JwtVerifier:
        common = dict(
            issuer=settings.jwt_issuer or None,
            audience=settings.jwt_audience,
            client_id=settings.jwt_client_id,
            leeway_s=settings.jwt_leeway_s,
        )
        if settings.jwks_url:
            return cls(jwks=JwksKeys(settings.jwks_url, settings.jwks_cache_s), **common)
        return cls(dev_key=DevKey(settings.data_dir), **common)

    async def verify(self, token: str | None) -> Principal:
        if not token:
            raise AuthError("missing_token", "a bearer token is required")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("invalid_token", "malformed token") from None
        if header.get("alg") not in ALGORITHMS:
            raise AuthError("invalid_token", "only RS256 tokens are accepted")
        if self.jwks is not None:
            key = await self.jwks.get(header.get("kid"))
            if key is None:
                raise AuthError("invalid_token", "token names no known key")
        else:
            assert self.dev_key is not None
            key = self.dev_key.public_key
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=ALGORITHMS,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "token has expired") from None
        except jwt.InvalidIssuerError:
            raise AuthError("invalid_token", "token issuer is not accepted") from None
        except jwt.PyJWTError as exc:
            raise AuthError("invalid_token", f"invalid token: {exc}") from None
        if self.audience:
            aud = claims.get("aud")
            auds = [aud] if isinstance(aud, str) else list(aud or [])
            if self.audience not in auds and claims.get("azp") != self.audience:
                raise AuthError("invalid_token", "token audience is not accepted")
        user_id = claims.get("sub") or claims.get("preferred_username")
        if not isinstance(user_id, str) or not user_id:
            raise AuthError("invalid_token", "token has no subject")
        name = claims.get("name")
        return Principal(
            user_id=user_id,
            name=name if isinstance(name, str) else None,
            roles=roles_of(claims, self.client_id),
            claims=claims,
        )


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
