"""JWT authentication: RS256 tokens verified against a JWKS (Keycloak) or the dev key.

Guarantees: only RS256 is accepted (``alg: none`` and HS256 are refused whatever key they
name); the key is chosen by the server, never by the token (``jku``, ``x5u`` and an
embedded ``jwk`` are ignored; a ``kid`` the key set does not hold is refused, with the dev
key too); ``exp`` is required, and a token is refused before its ``nbf`` or ``iat`` (both
with ``leeway_s``); issuer and audience (``aud`` or ``azp``) are checked when configured.
JWKS are fetched with an async HTTP client (the event loop is never blocked), one fetch at
a time whatever the number of waiting requests, and cached; a stale cache is refreshed in
the background while the last good keys keep serving; a failed fetch is not retried before
``min_refetch_s`` (doubling while it keeps failing), so an unreachable JWKS costs one
fetch per back-off period, not one per request; an unknown ``kid`` triggers at most one
refetch per ``min_refetch_s``. No usable key at all (the JWKS never answered) is a
server-side error (status 500, ``jwks_unavailable``), not the client's fault.
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
    """A token was missing, malformed, badly signed, expired or lacks a role (401/403), or
    the keys to check it cannot be had (500).

    ``code`` is the machine-readable error code of the response; ``reason`` the finer cause
    (``missing``, ``malformed``, ``algorithm``, ``unknown_key``, ``expired``, ``issuer``,
    ``audience``, ``no_subject``, ``invalid``, ``forbidden``, ``keys_unavailable``) that an
    API turns into a message in the client's language (with ``params``); ``message`` is
    the English text.
    """

    def __init__(self, code: str, message: str, status: int = 401, *, reason: str | None = None,
                 params: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.reason = reason or code
        self.params = params or {}


@dataclass(frozen=True)
class Principal:
    user_id: str
    name: str | None
    roles: frozenset[str]
    claims: dict[str, Any] = field(default_factory=dict, compare=False)

    def require(self, role: str | None) -> None:
        if role and role not in self.roles:
            raise AuthError("forbidden", f"role '{role}' is required", status=403,
                            reason="forbidden", params={"role": role})


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
    """Keys from a JWKS URL, fetched on the event loop (async client) and cached.

    At most one fetch runs at a time; requests that need it (no keys yet, an unknown
    ``kid``) wait for that one fetch, the others keep using the keys at hand. Stale keys
    (older than ``cache_s``) are refreshed in the background. After a failed fetch the
    next one waits ``min_refetch_s``, doubling up to ``cache_s`` while failures go on;
    meanwhile a request without a usable key fails at once instead of waiting for its own
    ``timeout_s`` fetch.
    """

    def __init__(self, url: str, cache_s: float = 300.0, min_refetch_s: float = 10.0,
                 timeout_s: float = 5.0) -> None:
        self.url = url
        self.cache_s = cache_s
        self.min_refetch_s = min_refetch_s
        self.timeout_s = timeout_s
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # end of the last fetch, good or bad
        self._failures = 0  # failed fetches in a row
        self._inflight: asyncio.Task[None] | None = None
        self.fetches = 0  # fetches started (observable)
        self.last_error: str | None = None

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
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
            if not keys:
                raise ValueError("the JWKS holds no RS256 signing key")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self._failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            # Keep serving with the last good key set.
            return
        finally:
            self._attempted_at = time.monotonic()  # after the fetch: back-off counts from here
        self._keys = keys
        self._fetched_at = self._attempted_at
        self._failures = 0
        self.last_error = None

    def _backoff_s(self) -> float:
        if self._failures == 0:
            return self.min_refetch_s
        return min(max(self.cache_s, self.min_refetch_s),
                   self.min_refetch_s * float(2 ** min(self._failures - 1, 16)))

    def _may_fetch(self) -> bool:
        return self._attempted_at is None or time.monotonic() - self._attempted_at >= self._backoff_s()

    def _refresh(self) -> asyncio.Task[None]:
        """The fetch in flight, or a new one."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._fetch())
        return self._inflight

    async def _wait_refresh(self) -> None:
        # shield: a cancelled request does not cancel the fetch others wait for.
        await asyncio.shield(self._refresh())

    def _stale(self) -> bool:
        return self._fetched_at is None or time.monotonic() - self._fetched_at > self.cache_s

    def _unavailable(self) -> AuthError:
        return AuthError("jwks_unavailable", f"signing keys are unavailable ({self.last_error})",
                         status=500, reason="keys_unavailable")

    async def ready(self) -> bool:
        try:
            await self.check()
            return True
        except AuthError:
            return False

    async def check(self) -> None:
        """Readiness: raises unless a usable key set is at hand (fetching one if allowed)."""
        await self.get(None)

    async def get(self, kid: str | None) -> Any:
        if not self._keys:
            if (self._inflight is not None and not self._inflight.done()) or self._may_fetch():
                await self._wait_refresh()
            if not self._keys:
                raise self._unavailable()
        elif kid is not None and kid not in self._keys and self._may_fetch():
            await self._wait_refresh()  # a rotated key: look for it once
        elif self._stale() and self._may_fetch():
            self._refresh()  # in the background; the keys at hand serve meanwhile
        if kid is None:
            if len(self._keys) == 1:
                return next(iter(self._keys.values()))
            return None
        if kid not in self._keys:
            raise AuthError("invalid_token", "token signed by an unknown key", reason="unknown_key")
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

    async def verify(self, token: str | None) -> Principal:
        if not token:
            raise AuthError("missing_token", "a bearer token is required", reason="missing")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("invalid_token", "malformed token", reason="malformed") from None
        if header.get("alg") not in ALGORITHMS:
            raise AuthError("invalid_token", "only RS256 tokens are accepted", reason="algorithm")
        if self.jwks is not None:
            key = await self.jwks.get(header.get("kid"))
            if key is None:
                raise AuthError("invalid_token", "token names no known key", reason="unknown_key")
        else:
            assert self.dev_key is not None
            if header.get("kid", DEV_KID) != DEV_KID:
                raise AuthError("invalid_token", "token signed by an unknown key",
                                reason="unknown_key")
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
            raise AuthError("token_expired", "token has expired", reason="expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("invalid_token", "token is not valid yet", reason="invalid") from None
        except jwt.InvalidIssuerError:
            raise AuthError("invalid_token", "token issuer is not accepted", reason="issuer") from None
        except jwt.PyJWTError as exc:
            raise AuthError("invalid_token", f"invalid token: {exc}", reason="invalid") from None
        if self.audience:
            aud = claims.get("aud")
            auds = [aud] if isinstance(aud, str) else list(aud or [])
            if self.audience not in auds and claims.get("azp") != self.audience:
                raise AuthError("invalid_token", "token audience is not accepted", reason="audience")
        user_id = claims.get("sub") or claims.get("preferred_username")
        if not isinstance(user_id, str) or not user_id:
            raise AuthError("invalid_token", "token has no subject", reason="no_subject")
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
