"""Every JWT attack of the catalogue against the running application: each HTTP endpoint
that needs a token answers 401 in its documented shape (``{"error": {"code", "message"}}``,
the seed's shape under ``/v1/notifications``) with ``WWW-Authenticate``, the WebSocket
handshake closes with 4401 before any frame, whether the token came in the query or the
``Authorization`` header, and nothing is created for the forged subject. A token of the
same issuer that is not tampered with gets through everywhere, so the refusals are the
attacks' doing."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import httpx
import pytest
import websockets

from client import create_chat
from serve_app.cli import DEFAULT_ROLES
from tests.client import user
from tests.conftest import App
from tests.security.tokens import Attack, Issuer, attacks, new_rsa_key

pytestmark = pytest.mark.e2e

ROGUE = new_rsa_key()
NAMES = [a.name for a in attacks(Issuer(ROGUE, "k", "i", "a"), "u", "v", ROGUE)]


@dataclass
class Target:
    """The forged subject, its victim (a user with a chat), and the issuer's key."""

    app: App
    issuer: Issuer
    intruder: str
    victim: str
    victim_chat: str

    @cached_property
    def catalogue(self) -> dict[str, Attack]:
        return {a.name: a for a in attacks(self.issuer, self.intruder, self.victim, ROGUE)}

    def attack(self, name: str) -> Attack:
        return self.catalogue[name]

    def endpoints(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(method, path, request options) of every endpoint that needs a token."""
        one = {"contacts": [{"type": "email", "value": "x@example.com"}], "message": "hi"}
        some_id = str(uuid.uuid4())
        return [
            ("POST", "/v1/chats", {"json": {"members": [user("bystander")]}}),
            ("GET", "/v1/chats", {}),
            ("GET", f"/v1/chats/{self.victim_chat}/messages", {}),
            ("GET", f"/v1/presence?userId={self.victim}", {}),
            ("POST", f"/v1/attachments/{some_id}/complete", {"headers": {"X-Upload-Token": "t"}}),
            ("GET", f"/v1/attachments/{some_id}/content", {}),
            ("POST", "/v1/notifications", {"json": one}),
            ("GET", f"/v1/notifications/{some_id}", {}),
        ]


@pytest.fixture(scope="module")
async def target(conveyor: App) -> Target:
    victim = user("victim")
    chat = await create_chat(conveyor.base_url, conveyor.token(victim), [user()])
    return Target(conveyor, Issuer.dev(conveyor.data_dir, DEFAULT_ROLES), user("intruder"),
                  victim, chat)


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


def refusal_code(path: str, body: dict[str, Any]) -> str:
    """The error code of a 401 body in the documented shape of ``path``."""
    if path.startswith("/v1/notifications"):
        assert body["error"] == "HTTP 401 Unauthorized" and body["message"], body
        return str(body["code"])
    assert set(body) == {"error"} and body["error"]["message"], body
    return str(body["error"]["code"])


async def traces(app: App, *users: str) -> int:
    """Rows anything did on behalf of ``users``: memberships, messages, notifications."""
    import asyncpg

    db = await asyncpg.connect(app.dsn)
    try:
        return int(await db.fetchval(
            "SELECT (SELECT count(*) FROM chat_members WHERE user_id = ANY($1::text[]))"
            " + (SELECT count(*) FROM messages WHERE sender_id = ANY($1::text[]))"
            " + (SELECT count(*) FROM notifications WHERE subject_id = ANY($1::text[]))",
            list(users)))
    finally:
        await db.close()


async def test_an_untampered_token_of_the_same_issuer_gets_through(target: Target) -> None:
    who = user("legit")
    token = target.issuer.valid(who)
    async with httpx.AsyncClient(base_url=target.app.base_url, headers=auth(token)) as http:
        for method, path, options in target.endpoints():
            r = await http.request(method, path, **options)
            assert r.status_code not in (401, 500), (method, path, r.status_code, r.text)
    for headers, url in (({}, f"{target.app.ws_url}?access_token={token}"),
                         (auth(token), target.app.ws_url)):
        async with websockets.connect(url, additional_headers=headers) as ws:
            hello = await asyncio.wait_for(ws.recv(), 5)
            assert '"connected"' in str(hello) and who in str(hello)


@pytest.mark.parametrize("name", NAMES)
async def test_attack_is_refused_by_every_http_endpoint(target: Target, name: str) -> None:
    attack = target.attack(name)
    async with httpx.AsyncClient(base_url=target.app.base_url,
                                 headers=auth(attack.token)) as http:
        for method, path, options in target.endpoints():
            r = await http.request(method, path, **options)
            assert r.status_code == 401, (name, method, path, r.status_code, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer"), (name, path)
            assert refusal_code(path, r.json()) == attack.code, (name, path, r.text)
    assert await traces(target.app, target.intruder) == 0
    assert await traces(target.app, target.victim) == 1  # the victim's own chat only


@pytest.mark.parametrize("carrier", ["query", "header"])
@pytest.mark.parametrize("name", NAMES)
async def test_attack_is_refused_at_the_websocket_handshake(target: Target, name: str,
                                                            carrier: str) -> None:
    token = target.attack(name).token
    url, headers = target.app.ws_url, {}
    if token is not None and carrier == "query":
        url += f"?access_token={token}"
    elif token is not None:
        headers = auth(token)
    async with websockets.connect(url, additional_headers=headers) as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            frame = await asyncio.wait_for(ws.recv(), 5)
            pytest.fail(f"{name}: the server sent {frame!r} instead of closing")
    assert info.value.rcvd is not None and info.value.rcvd.code == 4401, (name, info.value)


async def test_http_endpoints_take_the_token_only_from_the_authorization_header(
        target: Target) -> None:
    """``?access_token=`` is for the WebSocket handshake only (PROTOCOL.md)."""
    token = target.issuer.valid(target.intruder)
    async with httpx.AsyncClient(base_url=target.app.base_url) as http:
        for method, path, options in target.endpoints():
            sep = "&" if "?" in path else "?"
            r = await http.request(method, f"{path}{sep}access_token={token}", **options)
            assert r.status_code == 401, (method, path, r.text)
            assert refusal_code(path, r.json()) == "missing_token"
        for scheme in ("Basic", "Token", ""):
            r = await http.get("/v1/chats", headers={"Authorization": f"{scheme} {token}".strip()})
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_token", scheme
    assert await traces(target.app, target.intruder) == 0
