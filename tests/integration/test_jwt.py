"""JWT verification against a JWKS HTTP server the test starts (Keycloak-style RS256)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.auth import AuthError, JwksKeys, JwtVerifier
from tests.integration.notify_helpers import ISSUER, JwksServer, Key, free_port, jwks_server


@pytest.fixture
async def jwks() -> AsyncIterator[tuple[JwksServer, str, Key]]:
    async with jwks_server() as started:
        yield started


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
    p = await v.verify(key.sign())  # served by the last good keys; a refresh starts
    assert p.user_id == "user-123"
    for _ in range(200):  # the background refresh reaches the (failing) server
        if srv.fetches >= 2:
            break
        await asyncio.sleep(0.02)
    assert srv.fetches >= 2
    p = await v.verify(key.sign())  # the failed refresh did not drop the keys
    assert p.user_id == "user-123"


async def test_jwks_unreachable_from_the_start_is_a_server_error() -> None:
    """No usable key at all is the server's problem (500), not an invalid token (401)."""
    v = verifier(f"http://127.0.0.1:{free_port()}/certs")
    err = await refused(v, Key("k1").sign())
    assert err.status == 500 and err.code == "jwks_unavailable" and err.reason == "keys_unavailable"


async def test_unreachable_jwks_is_fetched_once_per_backoff_not_per_request(jwks: Any) -> None:
    """A stampede of requests while the JWKS does not answer: one fetch, shared; then the
    back-off: later requests fail at once without fetching again."""
    srv, url, key = jwks
    srv.failing, srv.gate = True, asyncio.Event()
    keys = JwksKeys(url, cache_s=300, min_refetch_s=60)
    v = JwtVerifier(issuer=ISSUER, audience="conveyor", client_id="conveyor", jwks=keys)
    pending = asyncio.gather(*(refused(v, key.sign()) for _ in range(20)))
    await asyncio.sleep(0.2)  # all twenty are waiting for the JWKS now
    srv.gate.set()
    errors = await asyncio.wait_for(pending, 30)
    assert {e.status for e in errors} == {500}
    assert srv.fetches == 1 and keys.fetches == 1
    again = await asyncio.gather(*(refused(v, key.sign()) for _ in range(20)))
    assert {e.code for e in again} == {"jwks_unavailable"}
    assert srv.fetches == 1  # backing off: no new fetch within min_refetch_s
    assert not await keys.ready()


async def test_backoff_ends_and_the_keys_come_back(jwks: Any) -> None:
    srv, url, key = jwks
    srv.failing = True
    keys = JwksKeys(url, cache_s=300, min_refetch_s=1.0)
    v = JwtVerifier(issuer=ISSUER, audience="conveyor", client_id="conveyor", jwks=keys)
    assert (await refused(v, key.sign())).status == 500
    srv.failing = False
    assert (await refused(v, key.sign())).status == 500  # still backing off: not fetched
    assert srv.fetches == 1
    for _ in range(200):  # bounded wait for the back-off to pass
        await asyncio.sleep(0.05)
        try:
            p = await v.verify(key.sign())
            break
        except AuthError:
            continue
    else:
        raise AssertionError("the keys never came back")
    assert p.user_id == "user-123" and srv.fetches == 2


async def test_a_refresh_in_flight_is_shared_and_does_not_block_known_keys(jwks: Any) -> None:
    srv, url, key = jwks
    keys = JwksKeys(url, cache_s=0.1, min_refetch_s=0)
    v = JwtVerifier(issuer=ISSUER, audience="conveyor", client_id="conveyor", jwks=keys)
    await v.verify(key.sign())
    await asyncio.sleep(0.15)  # the keys are now stale
    srv.gate = asyncio.Event()  # and the JWKS does not answer until the test lets it
    # Stale but usable keys: every request is answered while the refresh is still held
    # (waiting for it would never end: the bound only keeps a failure from hanging), and
    # all of them together start one refresh.
    verified = await asyncio.wait_for(asyncio.gather(*(v.verify(key.sign()) for _ in range(10))), 20)
    assert {p.user_id for p in verified} == {"user-123"}
    for _ in range(200):  # the one background refresh reaches the server
        if srv.fetches >= 2:
            break
        await asyncio.sleep(0.02)
    assert srv.fetches == 2
    assert keys._inflight is not None and not keys._inflight.done()  # still held
    srv.gate.set()
    for _ in range(200):
        if keys._inflight is not None and keys._inflight.done():
            break
        await asyncio.sleep(0.02)
    assert srv.fetches == 2 and (await v.verify(key.sign())).user_id == "user-123"


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
