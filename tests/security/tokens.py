"""The JWT attack catalogue: every kind of token the verifier must refuse, minted against
one issuer (its RSA key, ``kid``, issuer and audience), with the refusal expected of each.

Tokens are made with PyJWT, the library the verifier uses. PyJWT will not sign an HMAC
token with an RSA public key (the key-confusion attack), so that one is signed with the
standard library's ``hmac`` over PyJWT's own base64url encoding.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.utils import base64url_encode


def b64json(data: dict[str, Any]) -> str:
    return base64url_encode(json.dumps(data, separators=(",", ":")).encode()).decode()


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Issuer:
    """A legitimate issuer: what the server trusts."""

    private: rsa.RSAPrivateKey
    kid: str
    issuer: str
    audience: str
    roles: list[str] = field(default_factory=list)

    @classmethod
    def dev(cls, data_dir: Path, roles: list[str]) -> Issuer:
        """The embedded default's issuer: the dev key file the app made under ``data_dir``."""
        from adapters.auth import DEV_KID

        key = serialization.load_pem_private_key((data_dir / "dev-jwt-key.pem").read_bytes(),
                                                 password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return cls(key, DEV_KID, "conveyor-dev", "conveyor", roles)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def claims(self, subject: str, **over: Any) -> dict[str, Any]:
        """A valid claim set for ``subject``; ``over`` replaces claims (None removes one)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": subject, "preferred_username": subject, "iss": self.issuer, "aud": self.audience,
            "azp": self.audience, "iat": now, "exp": now + 600,
            "realm_access": {"roles": list(self.roles)},
        }
        claims.update(over)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims: dict[str, Any], *, key: rsa.RSAPrivateKey | None = None,
             algorithm: str = "RS256", **headers: Any) -> str:
        head = {"kid": self.kid, **headers}
        return jwt.encode(claims, key or self.private, algorithm=algorithm,
                          headers={k: v for k, v in head.items() if v is not None})

    def valid(self, sub: str) -> str:
        return self.sign(self.claims(sub))


@dataclass(frozen=True)
class Attack:
    """A token the server must refuse, and how: the ``AuthError`` code and reason."""

    name: str
    token: str | None
    code: str = "invalid_token"
    reason: str = "invalid"


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    return f"{b64json(header)}.{b64json(claims)}.{signature}"


def attacks(iss: Issuer, sub: str, victim: str, rogue: rsa.RSAPrivateKey,
            rogue_jku: str = "http://127.0.0.1:9/jwks.json") -> list[Attack]:
    """Every attack on a token for ``sub``; ``victim`` is whom a forger would rather be;
    ``rogue`` is the attacker's own RSA key; ``rogue_jku`` where the attacker would have
    the server fetch that key from."""
    now = int(time.time())
    good = iss.claims(sub)
    valid = iss.sign(good)
    head, _, sig = valid.split(".")
    rogue_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rogue.public_key()))
    confusion_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': iss.kid})}.{b64json(good)}"
    confusion_sig = base64url_encode(
        hmac.new(iss.public_pem(), confusion_input.encode(), hashlib.sha256).digest()).decode()
    return [
        Attack("missing", None, "missing_token", "missing"),
        Attack("garbage", "not-a-jwt", reason="malformed"),
        Attack("two_segments", f"{head}.{b64json(good)}", reason="malformed"),
        Attack("header_not_base64", f"!!!.{b64json(good)}.{sig}", reason="malformed"),
        Attack("header_not_an_object", f"{base64url_encode(b'[1]').decode()}.{b64json(good)}.{sig}",
               reason="malformed"),
        Attack("alg_none", unsigned({"alg": "none", "typ": "JWT", "kid": iss.kid},
                                    iss.claims(victim)), reason="algorithm"),
        Attack("alg_None_capitalised", unsigned({"alg": "None", "typ": "JWT", "kid": iss.kid},
                                                iss.claims(victim)), reason="algorithm"),
        Attack("hs256_keyed_with_rsa_public_key", f"{confusion_input}.{confusion_sig}",
               reason="algorithm"),
        Attack("rs512_with_the_real_key", iss.sign(good, algorithm="RS512"), reason="algorithm"),
        Attack("expired", iss.sign(iss.claims(sub, iat=now - 7200, exp=now - 3600)),
               "token_expired", "expired"),
        Attack("not_yet_valid_nbf", iss.sign(iss.claims(sub, nbf=now + 3600))),
        Attack("issued_in_the_future", iss.sign(iss.claims(sub, iat=now + 3600, exp=now + 7200))),
        Attack("no_expiry", iss.sign(iss.claims(sub, exp=None))),
        Attack("wrong_issuer", iss.sign(iss.claims(sub, iss="https://evil.example/realms/x")),
               reason="issuer"),
        Attack("no_issuer", iss.sign(iss.claims(sub, iss=None))),
        Attack("wrong_audience", iss.sign(iss.claims(sub, aud="other-app", azp="other-app")),
               reason="audience"),
        Attack("no_audience", iss.sign(iss.claims(sub, aud=None, azp=None)), reason="audience"),
        Attack("tampered_payload", f"{head}.{b64json(iss.claims(victim))}.{sig}"),
        Attack("tampered_roles", f"{head}.{b64json({**good, 'realm_access': {'roles': ['admin']}})}"
                                 f".{sig}"),
        Attack("signature_stripped", f"{head}.{valid.split('.')[1]}."),
        Attack("unknown_kid", iss.sign(iss.claims(victim), key=rogue, kid="rogue-key"),
               reason="unknown_key"),
        Attack("real_kid_signed_by_another_key", iss.sign(iss.claims(victim), key=rogue)),
        Attack("embedded_jwk_header", iss.sign(iss.claims(victim), key=rogue,
                                               jwk={**rogue_jwk, "kid": iss.kid})),
        Attack("jku_header_to_the_attackers_keys",
               iss.sign(iss.claims(victim), key=rogue, kid="rogue-key", jku=rogue_jku),
               reason="unknown_key"),
        Attack("no_subject", iss.sign(iss.claims(sub, sub=None, preferred_username=None)),
               reason="no_subject"),
    ]
