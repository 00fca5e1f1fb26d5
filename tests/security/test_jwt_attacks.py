"""JWT attacks against the verifier itself, in both of its modes: keys from a JWKS server
the test starts (Keycloak's shape) and the embedded default's dev key. Each attack must be
refused with its own code and reason (401), and a token of the same issuer that is not
tampered with must pass, so the refusals are the attacks' doing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.auth import AuthError, DevKey, JwksKeys, JwtVerifier
from tests.integration.notify_helpers import ISSUER, jwks_server
from tests.security.tokens import Attack, Issuer, attacks, new_rsa_key

ROGUE = new_rsa_key()
USER, VICTIM = "intruder", "victim-admin"


Catalogue = dict[str, Attack]


def catalogue(iss: Issuer, jku: str = "http://127.0.0.1:9/jwks.json") -> Catalogue:
    return {a.name: a for a in attacks(iss, USER, VICTIM, ROGUE, jku)}


@pytest.fixture(scope="module")
async def jwks_mode() -> AsyncIterator[tuple[JwtVerifier, Issuer, Catalogue, Any, Any]]:
    """A verifier on a JWKS server, its issuer, the attacks on it, that server, and an
    attacker's JWKS server (serving the rogue key) that a ``jku`` header points at."""
    async with jwks_server() as (srv, url, key), jwks_server() as (evil, evil_url, evil_key):
        evil_key.private = ROGUE
        verifier = JwtVerifier(issuer=ISSUER, audience="conveyor", client_id="conveyor",
                               jwks=JwksKeys(url, min_refetch_s=0))
        iss = Issuer(key.private, key.kid, ISSUER, "conveyor")
        yield verifier, iss, catalogue(iss, evil_url), srv, evil


@pytest.fixture(scope="module")
def dev_mode(tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[JwtVerifier, Issuer, Catalogue]:
    data_dir: Path = tmp_path_factory.mktemp("devkey")
    verifier = JwtVerifier(issuer="conveyor-dev", audience="conveyor", client_id="conveyor",
                           dev_key=DevKey(data_dir))
    iss = Issuer.dev(data_dir, roles=["user"])
    return verifier, iss, catalogue(iss)


NAMES = list(catalogue(Issuer(ROGUE, "k", "i", "a")))


async def refused(verifier: JwtVerifier, attack: Attack) -> None:
    with pytest.raises(AuthError) as info:
        await verifier.verify(attack.token)
    err = info.value
    assert (err.status, err.code, err.reason) == (401, attack.code, attack.reason), \
        f"{attack.name}: {err.status} {err.code}/{err.reason}: {err.message}"


async def test_an_untampered_token_passes_in_both_modes(jwks_mode: Any, dev_mode: Any) -> None:
    for verifier, iss, _ in (jwks_mode[:3], dev_mode):
        principal = await verifier.verify(iss.valid(USER))
        assert principal.user_id == USER


@pytest.mark.parametrize("name", NAMES)
async def test_attack_is_refused_with_keys_from_a_jwks_server(jwks_mode: Any, name: str) -> None:
    verifier, _, attack, srv, evil = jwks_mode
    before = evil.fetches
    await refused(verifier, attack[name])
    assert evil.fetches == before, "the verifier fetched keys from a URL the token named"
    assert srv.fetches >= 1


@pytest.mark.parametrize("name", NAMES)
async def test_attack_is_refused_with_the_dev_key(dev_mode: Any, name: str) -> None:
    verifier, _, attack = dev_mode
    await refused(verifier, attack[name])


async def test_the_dev_key_refuses_its_own_signature_under_another_kid(dev_mode: Any) -> None:
    """Signed by the dev key itself, but naming a key the server does not have."""
    verifier, iss, _ = dev_mode
    token = iss.sign(iss.claims(USER), kid="rotated-away")
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    assert info.value.reason == "unknown_key"
