"""The notification service end to end on the Serve app: accept → outbox → dispatcher →
e-mail (the embedded default writes .eml files), through the Serve proxy."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import App

pytestmark = pytest.mark.e2e
CHROMIUM = os.environ.get("CONVEYOR_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


def item(email: str, immediate: bool) -> dict[str, Any]:
    return {"contacts": [{"type": "email", "value": email}], "message": f"Привет, {email}!",
            "isImmediate": immediate}


async def wait_state(c: httpx.AsyncClient, nid: str, headers: dict[str, str], want: str) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for _ in range(150):
        r = await c.get(f"/v1/notifications/{nid}", headers=headers)
        got = r.json()
        if got.get("state") == want:
            return got
        await asyncio.sleep(0.2)
    raise AssertionError(f"notification {nid} stayed {got.get('state')}")


async def test_immediate_and_queued_notifications_are_delivered(conveyor: App) -> None:
    who = f"svc-{uuid.uuid4().hex[:6]}"
    h = {"Authorization": f"Bearer {conveyor.token(who, name='Billing')}"}
    async with httpx.AsyncClient(base_url=conveyor.base_url, timeout=30) as c:
        r = await c.post("/v1/notifications", headers=h,
                         json=[item("now@example.com", True), item("later@example.com", False),
                               {"contacts": [], "message": ""}])
        assert r.status_code == 207, r.text
        body = r.json()
        assert (body["acceptedCount"], body["rejectedCount"]) == (2, 1)
        assert body["details"][0]["notification"]["subject"] == {"id": who, "name": "Billing"}
        ids = [d["notification"]["id"] for d in body["details"][:2]]
        for nid in ids:
            got = await wait_state(c, nid, h, "delivered")
            assert got["channels"][0]["attempts"][0]["status"] == "delivered"
    for nid in ids:
        eml = conveyor.data_dir / "mail" / f"{nid}-0.eml"
        assert eml.exists()
        assert f"X-Notification-Id: {nid}" in eml.read_text()


async def test_contract_statuses_through_the_proxy(conveyor: App) -> None:
    h = {"Authorization": f"Bearer {conveyor.token('svc-a')}"}
    async with httpx.AsyncClient(base_url=conveyor.base_url, timeout=30) as c:
        bad = await c.post("/v1/notifications", headers=h, json={"contacts": [], "message": ""})
        anon = await c.post("/v1/notifications", json=item("a@example.com", False))
        norole = await c.post("/v1/notifications", json=item("a@example.com", False),
                              headers={"Authorization": f"Bearer {conveyor.token('svc-b', roles=['user'])}"})
        notjson = await c.post("/v1/notifications", headers={**h, "content-type": "application/json"},
                               content=b"{")
    assert bad.status_code == 400
    assert bad.json()["message"] == "Ни одно уведомление не прошло валидацию"
    assert anon.status_code == 401 and norole.status_code == 403 and notjson.status_code == 400
    assert bad.headers.get("x-trace-id")


async def test_idempotent_repeat_sends_once(conveyor: App, app_db: Any) -> None:
    h = {"Authorization": f"Bearer {conveyor.token('svc-idem')}", "Idempotency-Key": uuid.uuid4().hex}
    async with httpx.AsyncClient(base_url=conveyor.base_url, timeout=30) as c:
        one = await c.post("/v1/notifications", headers=h, json=item("once@example.com", True))
        two = await c.post("/v1/notifications", headers=h, json=item("once@example.com", True))
        other = await c.post("/v1/notifications", headers=h, json=item("twice@example.com", True))
    assert one.status_code == two.status_code == 202 and one.json() == two.json()
    assert other.status_code == 422
    nid = one.json()["details"][0]["notification"]["id"]
    assert await app_db.fetchval("SELECT count(*) FROM notifications WHERE subject_id = 'svc-idem'") == 1
    assert nid


async def test_readiness_covers_the_dispatcher(conveyor: App) -> None:
    async with httpx.AsyncClient(base_url=conveyor.base_url, timeout=30) as c:
        r = await c.get("/health/ready")
    checks = r.json()["checks"]
    assert checks["notification_dispatcher"]["status"] == "up"
    assert checks["mail_dir"]["status"] == "up"  # the embedded default's .eml folder is writable


async def test_swagger_ui_loads_in_headless_chromium_without_external_requests(conveyor: App) -> None:
    playwright = pytest.importorskip("playwright.async_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium binary (apt-get install chromium)")
    requests: list[str] = []
    async with playwright.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=["--no-sandbox", "--disable-gpu"])
        try:
            page = await browser.new_page()
            page.on("request", lambda req: requests.append(req.url))
            await page.goto(f"{conveyor.base_url}/api-docs")
            await page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
            title = await page.inner_text(".swagger-ui .info .title")
            await page.wait_for_selector(".opblock-summary-path", timeout=20_000)
            paths = await page.locator(".opblock-summary-path").all_inner_texts()
        finally:
            await browser.close()
    # One document for every HTTP API: the notification service's and the messenger's.
    assert title.split("\n")[0].strip() == "Conveyor"
    assert any("/v1/notifications" in p for p in paths)
    assert any("/v1/chats" in p for p in paths)
    assert any(u.endswith("/openapi.json") for u in requests)
    external = [u for u in requests if not u.startswith(conveyor.base_url) and not u.startswith("data:")]
    assert external == []
