"""The web client (``/app``) in a real browser: Debian's Chromium driven by Playwright.

A second small Serve application in the session's Ray (its own database, under ``/web``)
keeps attachments in the app's own local store, so everything the page does — the page,
its modules, the API, the WebSocket, uploads and previews — stays on one origin, which
every test checks from the requests the browser made. The app is served under a route
prefix on purpose: the client resolves every URL relative to where it was loaded.

Screenshots are kept in ``test-artifacts/web/`` (stable names, overwritten each run).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import struct
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from client import WsClient, create_chat
from tests.conftest import App, side_app

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CONVEYOR_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
PREFIX = "/web"
WAIT_MS = 20_000

pw = pytest.importorskip("playwright.async_api")
expect = pw.expect
expect.set_options(timeout=WAIT_MS)


def name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def png(width: int, height: int, seed: int = 7) -> bytes:
    """A real PNG of noise (so it does not compress to nothing and the upload takes a while)."""
    rnd = random.Random(seed)
    raw = b"".join(b"\x00" + rnd.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def web_app(conveyor: App, new_database: Any) -> Iterator[App]:
    """The app with its own local object store (one small gateway replica, its own
    database), under /web in the session's Ray; same dev key as the session app."""
    settings = {**conveyor.settings, "database_url": new_database("web"), "s3_endpoint": None,
                "s3_access_key": None, "s3_secret_key": None}
    with side_app(conveyor, PREFIX.strip("/"), settings) as app:
        yield app


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (CI installs it)")
    async with pw.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            await b.close()


class Person:
    """One browser context (its own storage, as a second person's browser would be)."""

    def __init__(self, ctx: Any, page: Any, user: str) -> None:
        self.ctx, self.page, self.user = ctx, page, user
        self.urls: list[str] = []
        self.sent: list[dict[str, Any]] = []       # WebSocket frames the page sent
        self.received: list[dict[str, Any]] = []   # and those it received

    def on_websocket(self, ws: Any) -> None:
        self.urls.append(ws.url)
        ws.on("framesent", lambda payload: self.sent.append(frame_of(payload)))
        ws.on("framereceived", lambda payload: self.received.append(frame_of(payload)))

    def message(self, text: str) -> Any:
        return self.page.locator("#messages li.msg", has_text=text)

    async def shot(self, file: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / file), full_page=True)


def frame_of(payload: str | bytes) -> dict[str, Any]:
    try:
        frame = json.loads(payload)
    except ValueError:
        return {}
    return frame if isinstance(frame, dict) else {}


async def open_person(browser: Any, app: App, user: str | None, **ctx_opts: Any) -> Person:
    ctx = await browser.new_context(viewport={"width": 1100, "height": 820}, **ctx_opts)
    page = await ctx.new_page()
    person = Person(ctx, page, user or "")
    ctx.on("request", lambda req: person.urls.append(req.url))
    page.on("websocket", person.on_websocket)
    await page.goto(f"{app.base_url}/app")
    if user is not None:
        await expect(page.get_by_label("User name")).to_be_focused()
        await page.get_by_label("User name").fill(user)
        await page.get_by_role("button", name="Sign in", exact=True).click()
        await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
        await expect(page.locator("#me-name")).to_have_text(user)
    return person


def assert_same_origin(app: App, *people: Person) -> None:
    origin = urlsplit(app.base_url)
    seen = [u for p in people for u in p.urls]
    assert seen, "the browser made no requests?"
    outside = []
    for u in seen:
        parts = urlsplit(u)
        if parts.scheme in ("blob", "data"):
            continue
        if (parts.hostname, parts.port) != (origin.hostname, origin.port) \
                or parts.scheme not in ("http", "ws"):
            outside.append(u)
    assert outside == [], f"requests left the origin: {outside}"


async def test_root_app_serves_the_client_with_dev_sign_in(conveyor: App) -> None:
    """The session app (embedded defaults) serves /app and mints working dev tokens."""
    async with httpx.AsyncClient(base_url=conveyor.base_url, timeout=30) as http:
        r = await http.get("/app", follow_redirects=True)
        assert r.status_code == 200 and '<script type="module" src="main.js">' in r.text
        assert (await http.get("/app/config.json")).json() == {"auth": {"mode": "dev"}}
        bad = await http.post("/app/dev-token", json={"userId": "no spaces"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid"
        tok = (await http.post("/app/dev-token", json={"userId": "web-root"})).json()["token"]
        chats = await http.get("/v1/chats", headers={"Authorization": f"Bearer {tok}"})
        assert chats.status_code == 200 and chats.json() == {"chats": []}


async def test_two_people_chat(browser: Any, web_app: App) -> None:
    alice_id, bob_id = name("alice"), name("bob")
    alice = await open_person(browser, web_app, alice_id)
    bob = await open_person(browser, web_app, bob_id)
    a, b = alice.page, bob.page
    try:
        # Alice creates a chat with Bob; Bob is online (a green dot on her side).
        await a.get_by_label("New chat with").fill(bob_id)
        await a.get_by_role("button", name="Create chat").click()
        await expect(a.locator("#conv-title")).to_have_text(bob_id)
        await expect(a.get_by_label("Message", exact=True)).to_be_focused()
        await expect(a.locator(f'#conv-members .presence[data-user="{bob_id}"]')).to_have_attribute(
            "data-online", "true")

        # Send → Bob's list shows the chat with one unread and the last message; Alice's
        # tick says delivered (Bob's client acked it to the server, which tells Alice), then
        # read once Bob opens it.
        await a.get_by_label("Message", exact=True).fill("hello bob")
        await a.keyboard.press("Enter")
        mine = alice.message("hello bob")
        await expect(mine.locator(".ticks")).to_have_attribute("data-status", "delivered")
        item = b.locator("#chat-list li").filter(has_text=alice_id)
        await expect(item.locator(".unread")).to_have_text("1")
        await expect(item.locator(".chat-last")).to_have_text(f"{alice_id}: hello bob")
        await bob.shot("bob-chat-list-unread.png")
        await item.get_by_role("button").click()
        await expect(bob.message("hello bob").locator(".body")).to_have_text("hello bob")
        await expect(item.locator(".unread")).to_have_count(0)
        await expect(mine.locator(".ticks")).to_have_attribute("data-status", "read")
        await expect(mine.locator(".ticks")).to_have_attribute("aria-label", f"Read by {bob_id}")

        # Typing: Bob types, Alice sees it; it goes once Bob sends.
        await b.get_by_label("Message", exact=True).press_sequentially("hi alice", delay=30)
        await expect(a.locator("#typing")).to_have_text(f"{bob_id} is typing…")
        await b.keyboard.press("Enter")
        await expect(alice.message("hi alice").locator(".body")).to_have_text("hi alice")
        await expect(a.locator("#typing")).to_have_text("")

        # A reaction (Alice on Bob's message), an edit (Bob), a delete (Alice): both see them.
        theirs = alice.message("hi alice")
        await theirs.get_by_role("button", name="React to this message").click()
        await theirs.get_by_role("button", name="React with 👍").click()
        for p in (alice, bob):
            await expect(p.message("hi alice").locator(".reaction")).to_have_text("👍 1")
        mid = await bob.message("hi alice").get_attribute("data-message-id")
        own = b.locator(f'#messages li.msg[data-message-id="{mid}"]')
        await own.get_by_role("button", name="Edit", exact=True).click()
        await own.get_by_label("Edit message").fill("hi alice, edited")
        await own.get_by_role("button", name="Save").click()
        for p in (alice, bob):
            edited = p.message("hi alice, edited")
            await expect(edited.locator(".body")).to_have_text("hi alice, edited")
            await expect(edited.locator(".edited")).to_have_text("(edited)")
            await expect(edited.locator(".reaction")).to_have_text("👍 1")
        await mine.get_by_role("button", name="Delete", exact=True).click()
        await mine.get_by_role("button", name="Delete", exact=True).click()   # confirm
        for p in (alice, bob):
            gone = p.page.locator("#messages li.msg.deleted")
            await expect(gone).to_have_count(1)
            await expect(gone.locator(".tombstone")).to_have_text("Message deleted")
        await expect(b.locator("#messages")).not_to_contain_text("hello bob")

        # An image: progress bar while it uploads, then a preview on both sides.
        await a.evaluate("""() => {
            window.__progress = [];
            new MutationObserver(() => {
              for (const p of document.querySelectorAll('#uploads progress')) window.__progress.push(p.value);
            }).observe(document.getElementById('uploads'),
                       {subtree: true, childList: true, attributes: true});
        }""")
        image = png(400, 300)
        await a.locator("#file-input").set_input_files(
            files=[{"name": "noise.png", "mimeType": "image/png", "buffer": image}])
        for p in (alice, bob):
            preview = p.page.locator('#messages img.preview[alt="noise.png"]')
            await expect(preview).to_be_visible()
            await p.page.wait_for_function(
                "() => { const i = document.querySelector('img.preview[alt=\"noise.png\"]');"
                " return i && i.complete && i.naturalWidth === 400 && i.naturalHeight === 300; }",
                timeout=WAIT_MS)
        progress = await a.evaluate("window.__progress")
        assert progress and max(progress) == 100, progress
        await expect(bob.message("noise.png").locator(".attachment figcaption")).to_contain_text(
            "Download noise.png")

        await expect(a.locator("#uploads li")).to_have_count(0)   # done: the row goes
        await alice.shot("alice-conversation.png")
        await bob.shot("bob-conversation.png")

        # A refusal shows the server's reason (a body over max_body_chars).
        await a.get_by_label("Message", exact=True).fill("x" * 4001)
        await a.keyboard.press("Enter")
        refusal = a.locator("li.outgoing.failed .refusal")
        await expect(refusal).to_contain_text("Not sent:")
        await expect(refusal).to_contain_text("(invalid)")
        await alice.shot("alice-refused.png")
        await refusal.get_by_role("button", name="Discard").click()
        await expect(a.locator("li.outgoing")).to_have_count(0)

        # Bob goes offline; Alice writes three messages; Bob comes back and catches up, in order.
        await bob.ctx.set_offline(True)
        await expect(b.locator("#conn-state")).to_have_attribute("data-state", "offline")
        await expect(b.locator("#conn-state")).to_have_text("Offline: waiting for the network")
        for text in ("one", "two", "three"):
            await a.get_by_label("Message", exact=True).fill(text)
            await a.keyboard.press("Enter")
            ticks = alice.message(text).locator(".ticks")
            await expect(ticks).not_to_have_attribute("data-status", "sending")
        await bob.shot("bob-offline.png")
        await expect(b.locator("#messages")).not_to_contain_text("three")
        await bob.ctx.set_offline(False)
        await expect(b.locator("#conn-state")).to_have_attribute("data-state", "connected")
        bodies = b.locator("#messages li.msg:not(.deleted) .body")
        await expect(bodies).to_have_text(["hi alice, edited", "one", "two", "three"])
        seqs = [int(s) for s in await b.locator("#messages li.msg").evaluate_all(
            "els => els.map(e => e.dataset.seq)")]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
        await expect(alice.message("three").locator(".ticks")).to_have_attribute("data-status", "read")
        await bob.shot("bob-caught-up.png")

        # The ticks came through the server: Bob's page acked with `receipt` frames, its
        # signals were typing ones only, and Alice's page got `receipt` system events.
        assert {"delivered", "read"} <= {f.get("status") for f in bob.sent if f.get("type") == "receipt"}
        signalled = [f["payload"] for f in bob.sent if f.get("type") == "signal"]
        assert signalled and all(set(p) <= {"typing", "chatId"} for p in signalled), signalled
        events = [f["data"] for f in alice.received
                  if f.get("type") == "system" and f.get("event") == "receipt"]
        assert any(e["userId"] == bob_id and e["readSeq"] >= 1 for e in events), events

        # A receipt Alice is away for reaches her through the chat list when she reconnects:
        # Bob is offline when she sends "four", she goes offline, Bob comes back and reads it.
        await bob.ctx.set_offline(True)
        await expect(b.locator("#conn-state")).to_have_attribute("data-state", "offline")
        await a.get_by_label("Message", exact=True).fill("four")
        await a.keyboard.press("Enter")
        four = alice.message("four").locator(".ticks")
        await expect(four).to_have_attribute("data-status", "sent")
        four_seq = int(await alice.message("four").get_attribute("data-seq") or 0)
        await alice.ctx.set_offline(True)
        await expect(a.locator("#conn-state")).to_have_attribute("data-state", "offline")
        await bob.ctx.set_offline(False)
        await expect(bob.message("four").locator(".body")).to_have_text("four")
        async with httpx.AsyncClient(base_url=web_app.base_url, headers=web_app.auth(alice_id)) as http:
            for _ in range(200):
                (row,) = (await http.get("/v1/chats")).json()["chats"]
                if row["peers"][0]["readSeq"] >= four_seq:
                    break
                await asyncio.sleep(0.1)
            assert row["peers"] == [{"userId": bob_id, "deliveredSeq": four_seq, "readSeq": four_seq}], row
        await expect(four).to_have_attribute("data-status", "sent")     # still away
        await alice.ctx.set_offline(False)
        await expect(a.locator("#conn-state")).to_have_attribute("data-state", "connected")
        await expect(four).to_have_attribute("data-status", "read")

        # After a reload Alice's earlier messages still show read ticks (from the chat list).
        await a.reload()
        await expect(a.locator("#conn-state")).to_have_attribute("data-state", "connected")
        await a.locator("#chat-list li").filter(has_text=bob_id).get_by_role("button").click()
        for text in ("one", "two", "three", "four"):
            ticks = alice.message(text).locator(".ticks")
            await expect(ticks).to_have_attribute("data-status", "read")
            await expect(ticks).to_have_attribute("aria-label", f"Read by {bob_id}")
        await expect(alice.message("noise.png").locator(".ticks")).to_have_attribute("data-status", "read")
        await alice.shot("alice-reloaded.png")
        assert_same_origin(web_app, alice, bob)
    finally:
        await alice.ctx.close()
        await bob.ctx.close()


async def test_history_pages_upward(browser: Any, web_app: App) -> None:
    sender, reader = name("ann"), name("ben")
    chat = await create_chat(web_app.base_url, web_app.token(sender), [reader])
    ws = await WsClient.connect(web_app.ws_url, web_app.token(sender))
    try:
        for i in range(1, 41):
            await ws.ack(await ws.chat(chat, f"m{i}"))
    finally:
        await ws.close()
    # Ben read them elsewhere (his pointer is at m40): nothing is replayed to the browser,
    # which shows the newest page and loads older ones on demand.
    ws = await WsClient.connect(web_app.ws_url, web_app.token(reader))
    try:
        last = await ws.message(body="m40")
        await ws.receipt([last["messageId"]], "read")
        async with httpx.AsyncClient(base_url=web_app.base_url, headers=web_app.auth(reader)) as http:
            for _ in range(100):
                (row,) = (await http.get("/v1/chats")).json()["chats"]
                if row["deliveredSeq"] == 40:
                    break
                await asyncio.sleep(0.1)
            assert row["deliveredSeq"] == 40 and row["unreadCount"] == 0, row
    finally:
        await ws.close()
    ben = await open_person(browser, web_app, reader)
    try:
        page = ben.page
        await page.locator("#chat-list li").filter(has_text=sender).get_by_role("button").click()
        bodies = page.locator("#messages li.msg .body")
        await expect(bodies).to_have_count(30)          # the newest page
        await expect(bodies.first).to_have_text("m11")
        await expect(bodies.last).to_have_text("m40")
        await page.get_by_role("button", name="Load earlier messages").click()
        await expect(bodies).to_have_count(40)
        await expect(bodies).to_have_text([f"m{i}" for i in range(1, 41)])
        await expect(page.get_by_role("button", name="Load earlier messages")).to_be_hidden()
        assert_same_origin(web_app, ben)
    finally:
        await ben.ctx.close()


async def axe_violations(page: Any) -> list[dict[str, Any]]:
    from axe_playwright_python.async_playwright import Axe

    results = await Axe().run(page)
    ran = {r["id"] for kind in ("passes", "violations", "incomplete") for r in results.response[kind]}
    assert "color-contrast" in ran, "axe-core did not run its rules"
    return [v for v in results.response["violations"] if v.get("impact") in ("serious", "critical")]


async def test_accessibility_keyboard_and_dark_mode(browser: Any, web_app: App) -> None:
    me, peer = name("kim"), name("lee")
    other = name("max")
    for members in ([peer], [other]):
        chat = await create_chat(web_app.base_url, web_app.token(me), members)
        ws = await WsClient.connect(web_app.ws_url, web_app.token(members[0]))
        try:
            await ws.ack(await ws.chat(chat, f"hello from {members[0]}"))
        finally:
            await ws.close()
    person = await open_person(browser, web_app, None)
    page = person.page
    try:
        # The sign-in page: no serious violations; signing in by keyboard alone.
        assert await axe_violations(page) == []
        await person.shot("signin.png")
        await expect(page.get_by_label("User name")).to_be_focused()
        await page.keyboard.type(me)                    # the user name field has focus
        await page.keyboard.press("Enter")
        await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
        chats = page.locator("#chat-list button.chat-item")
        await expect(chats).to_have_count(2)

        # Arrow keys move between chats, Enter opens one and focus goes to the message box.
        await chats.first.focus()
        await page.keyboard.press("ArrowDown")
        await expect(chats.nth(1)).to_be_focused()
        await page.keyboard.press("ArrowUp")
        await expect(chats.first).to_be_focused()
        await page.keyboard.press("End")
        await expect(chats.nth(1)).to_be_focused()
        await page.keyboard.press("Enter")
        box = page.get_by_label("Message", exact=True)
        await expect(box).to_be_focused()
        await page.keyboard.type("sent with the keyboard")
        await page.keyboard.press("Enter")
        await expect(person.message("sent with the keyboard").locator(".ticks")).not_to_have_attribute(
            "data-status", "sending")
        # Focus order after the box: Attach file, then Send.
        await box.focus()
        await page.keyboard.press("Tab")
        await expect(page.get_by_role("button", name="Attach file")).to_be_focused()
        await page.keyboard.press("Tab")
        await expect(page.get_by_role("button", name="Send")).to_be_focused()
        # The skip link is the first stop and lands in the message box.
        await page.keyboard.press("Shift+Tab")   # from the message box backwards ...
        for _ in range(40):                      # ... to the first stop of the page
            if await page.evaluate("document.activeElement.id") == "skip-link":
                break
            await page.keyboard.press("Shift+Tab")
        await expect(page.locator("#skip-link")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(box).to_be_focused()
        # Every interactive element has an accessible name, in light and in dark.
        assert await axe_violations(page) == []
        await person.shot("conversation-light.png")

        await page.emulate_media(color_scheme="dark")
        bg = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        rgb = [int(x) for x in bg[bg.index("(") + 1:bg.index(")")].split(",")[:3]]
        assert sum(rgb) < 3 * 60, f"dark mode background is not dark: {bg}"
        assert await axe_violations(page) == []
        await person.shot("conversation-dark.png")
        await page.emulate_media(color_scheme="light")
        bg = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert bg == "rgb(255, 255, 255)"
        assert_same_origin(web_app, person)
    finally:
        await person.ctx.close()


class ThreadedServer:
    """A uvicorn server for a small Starlette app, in a thread of its own."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        from tests.conftest import free_port

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", ws="none"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ThreadedServer:
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            await asyncio.sleep(0.05)
        raise RuntimeError("server did not start")

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await asyncio.to_thread(self.thread.join, 10)


async def test_single_sign_on_with_pkce(browser: Any) -> None:
    """With an issuer configured, the app signs in by authorization code + PKCE: a fake
    Keycloak-style issuer checks the S256 challenge against the verifier, and the page uses
    the access token it got for the API."""
    import base64
    import hashlib
    import json

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, RedirectResponse, Response
    from starlette.routing import Route

    from webclient import web_routes

    seen: dict[str, Any] = {}
    claims = {"sub": "sso-user", "exp": 4102444800}
    token = "e30." + base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=") + ".sig"

    async def authorize(request: Request) -> Response:
        q = request.query_params
        seen["authorize"] = dict(q)
        assert q["response_type"] == "code" and q["client_id"] == "conveyor-web"
        assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
        seen["challenge"] = q["code_challenge"]
        return RedirectResponse(f"{q['redirect_uri']}?code=the-code&state={q['state']}", 302)

    async def token_endpoint(request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode()))
        seen["token"] = form
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        ok = (form.get("grant_type") == "authorization_code" and form.get("code") == "the-code"
              and form.get("client_id") == "conveyor-web"
              and base64.urlsafe_b64encode(digest).decode().rstrip("=") == seen.get("challenge"))
        body = {"access_token": token, "token_type": "Bearer", "expires_in": 300} if ok \
            else {"error": "invalid_grant"}
        return JSONResponse(body, 200 if ok else 400,
                            headers={"Access-Control-Allow-Origin": seen["origin"]})

    async def chats(request: Request) -> Response:
        seen["api_auth"] = request.headers.get("authorization")
        return JSONResponse({"chats": []})

    realm = "/realms/acme/protocol/openid-connect"
    issuer_app = Starlette(routes=[Route(f"{realm}/auth", authorize),
                                   Route(f"{realm}/token", token_endpoint, methods=["POST"])])
    async with ThreadedServer(issuer_app) as issuer:
        iss = f"{issuer.url}/realms/acme"
        oidc = {"issuer": iss, "clientId": "conveyor-web",
                "authorizationEndpoint": f"{iss}/protocol/openid-connect/auth",
                "tokenEndpoint": f"{iss}/protocol/openid-connect/token"}
        app = Starlette(routes=[*web_routes(dev_token=None, oidc=oidc),
                                Route("/v1/chats", chats), Route("/v1/presence", chats)])
        async with ThreadedServer(app) as site:
            seen["origin"] = site.url
            ctx = await browser.new_context()
            try:
                page = await ctx.new_page()
                await page.goto(f"{site.url}/app")
                await expect(page.locator("#dev-form")).to_be_hidden()
                await expect(page.locator("#oidc-issuer")).to_have_text(f"127.0.0.1:{issuer.port}")
                await page.get_by_role("button", name="Sign in with single sign-on").click()
                await expect(page.locator("#me-name")).to_have_text("sso-user")
                assert page.url == f"{site.url}/app/"          # code and state gone from the URL
                assert seen["authorize"]["redirect_uri"] == f"{site.url}/app/"
                assert seen["token"]["redirect_uri"] == f"{site.url}/app/"
                for _ in range(200):  # the chat list loads right after sign-in
                    if "api_auth" in seen:
                        break
                    await asyncio.sleep(0.05)
                assert seen.get("api_auth") == f"Bearer {token}"
            finally:
                await ctx.close()


async def test_running_out_of_credits_shows_a_banner_with_the_retry_time(
        browser: Any, conveyor: App, new_database: Any) -> None:
    """An app whose users have 3 credits a minute: a burst runs out of them, the refused
    messages say "Not sent", and a banner counts down to the retry time (the system
    credits_exhausted frame)."""
    settings = {**conveyor.settings, "database_url": new_database("webtight"), "s3_endpoint": None,
                "s3_access_key": None, "s3_secret_key": None,
                "credit_capacity": 3, "credit_refill": 3, "credit_interval_s": 60.0,
                # Its own credit bank (state actors are named, and shared by name).
                "state_actor_prefix": "webtight"}
    with side_app(conveyor, "webtight", settings) as app:
        alice = await open_person(browser, app, name("alice"))
        a = alice.page
        try:
            await a.get_by_label("New chat with").fill(name("bob"))
            await a.get_by_role("button", name="Create chat").click()
            # Each message costs a credit, and so does each typing signal the page sends.
            for i in range(6):
                await a.get_by_label("Message", exact=True).fill(f"burst {i}")
                await a.keyboard.press("Enter")
            banner = a.locator('#banners [data-key="credits"]')
            await expect(banner).to_contain_text("Out of credits")
            await expect(banner).to_contain_text(re.compile(r"Try again in \d+ s"))
            await expect(alice.message("burst 5")).to_contain_text("Not sent")
            await expect(alice.message("burst 0")).not_to_contain_text("Not sent")
            refused = [f for f in alice.received if f.get("type") == "ack"
                       and f.get("status") == "rejected"]
            assert refused and {f["error"]["code"] for f in refused} == {"credits_exhausted"}
            assert all(f["error"]["retryAfter"] > 0 for f in refused)
            accepted = [f for f in alice.received if f.get("type") == "ack"
                        and f.get("status") == "accepted"]
            assert len(accepted) <= 3  # never more than the user's 3 credits
            await alice.shot("alice-out-of-credits.png")
            assert_same_origin(app, alice)
        finally:
            await alice.ctx.close()
