"""POST/GET /v1/notifications, docs and middleware through httpx.ASGITransport on the
routes the gateway mounts, against a real PostgreSQL. The seed's examples and rules are
contract tests here."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from openapi_spec_validator import validate

from tests.integration.notify_helpers import build_api, client, token

SEED_SINGLE = {"contacts": [{"type": "email", "value": "user@example.com"}], "message": "Привет!",
               "isImmediate": False, "strategy": "send_to_first_available"}
SEED_FULL = {"contacts": [{"type": "email", "value": "user@company.com"}, {"type": "bitrix", "value": 12345}],
             "message": "Ваш заказ №12345 готов к выдаче", "isImmediate": True,
             "strategy": "send_to_first_available"}
SEED_ARRAY = [
    {"contacts": [{"type": "email", "value": "user1@example.com"}], "message": "Привет, user1!",
     "isImmediate": True},
    {"contacts": [{"type": "bitrix", "value": 12345}], "message": "Привет, user2!",
     "strategy": "send_to_all_available"},
]
SEED_BAD = {"contacts": [], "message": ""}
SEED_TOO_SMALL = {"code": "too_small", "message": "List must contain at least 1 element(s)",
                  "path": ["contacts"]}
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
CREATED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
async def api(db_pool: asyncpg.Pool, tmp_path: Path) -> Any:
    return await build_api(db_pool, tmp_path)


def post(c: Any, body: Any, tok: str | None, **headers: str) -> Any:
    h = {"content-type": "application/json", **headers}
    if tok is not None:
        h["authorization"] = f"Bearer {tok}"
    return c.post("/v1/notifications", content=json.dumps(body).encode(), headers=h)


def check_issue(issue: dict[str, Any]) -> None:
    assert {"code", "message", "path"} <= set(issue)
    assert issue["code"] in {"too_small", "too_big", "invalid_type", "invalid_enum_value",
                             "invalid_string", "unrecognized_keys"}


async def test_single_notification_is_accepted_with_202(api: Any, db_pool: asyncpg.Pool) -> None:
    app, _, handle, key = api
    async with client(app) as c:
        r = await post(c, SEED_SINGLE, token(key, name="John Doe"))
    assert r.status_code == 202
    body = r.json()
    assert set(body) == {"message", "totalCount", "acceptedCount", "rejectedCount", "details"}
    assert (body["totalCount"], body["acceptedCount"], body["rejectedCount"]) == (1, 1, 0)
    [d] = body["details"]
    assert d["status"] == "success"
    n = d["notification"]
    assert UUID4.match(n["id"]) and CREATED.match(n["createdAt"])
    assert n["subject"] == {"id": "user-123", "name": "John Doe"}
    assert {k: n[k] for k in SEED_SINGLE} == SEED_SINGLE
    assert handle.kicked == []  # queued, not immediate
    row = await db_pool.fetchrow("SELECT n.state, o.immediate FROM notifications n JOIN"
                                 " notification_outbox o ON o.notification_id = n.id WHERE n.id = $1",
                                 uuid.UUID(n["id"]))
    assert row["state"] == "accepted" and row["immediate"] is False


async def test_seed_full_example_is_accepted_and_dispatched_now(api: Any) -> None:
    app, _, handle, key = api
    async with client(app) as c:
        r = await post(c, SEED_FULL, token(key))
    assert r.status_code == 202
    n = r.json()["details"][0]["notification"]
    assert n["contacts"] == SEED_FULL["contacts"] and n["isImmediate"] is True
    assert n["subject"] == {"id": "user-123"}  # no name in the token: no name in subject
    await asyncio.sleep(0)
    assert handle.kicked == [[n["id"]]]


async def test_seed_array_example_gets_defaults(api: Any) -> None:
    app, _, _, key = api
    async with client(app) as c:
        r = await post(c, SEED_ARRAY, token(key))
    assert r.status_code == 202
    body = r.json()
    assert (body["totalCount"], body["acceptedCount"], body["rejectedCount"]) == (2, 2, 0)
    first, second = (d["notification"] for d in body["details"])
    assert first["strategy"] == "send_to_first_available" and first["isImmediate"] is True
    assert second["strategy"] == "send_to_all_available" and second["isImmediate"] is False
    assert first["id"] != second["id"]


async def test_partial_success_is_207_in_the_seed_shape(api: Any, db_pool: asyncpg.Pool) -> None:
    app, _, _, key = api
    ok = {"contacts": [{"type": "email", "value": "ok@ok.com"}], "message": "Hi", "isImmediate": True,
          "strategy": "send_to_first_available"}
    async with client(app) as c:
        r = await post(c, [ok, ok, SEED_BAD], token(key))
    assert r.status_code == 207
    body = r.json()
    assert body["message"] == "Уведомления приняты частично: 2 принято, 1 отклонено"
    assert (body["totalCount"], body["acceptedCount"], body["rejectedCount"]) == (3, 2, 1)
    assert [d["status"] for d in body["details"]] == ["success", "success", "failure"]
    fail = body["details"][2]
    assert fail["notification"] == SEED_BAD
    assert {k: fail["error"][0][k] for k in SEED_TOO_SMALL} == SEED_TOO_SMALL
    for issue in fail["error"]:
        check_issue(issue)
    assert await db_pool.fetchval("SELECT count(*) FROM notifications") == 2


async def test_no_valid_notification_is_400_in_the_seed_shape(api: Any, db_pool: asyncpg.Pool) -> None:
    app, _, _, key = api
    async with client(app) as c:
        r = await post(c, SEED_BAD, token(key))
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "HTTP 400 Bad Request"
    assert body["message"] == "Ни одно уведомление не прошло валидацию"
    [d] = body["details"]
    assert d["item"] == SEED_BAD
    assert {k: d["error"][0][k] for k in SEED_TOO_SMALL} == SEED_TOO_SMALL
    assert await db_pool.fetchval("SELECT count(*) FROM notifications") == 0


@pytest.mark.parametrize("body, code", [([], "too_small"), ([SEED_SINGLE] * 101, "too_big")])
async def test_empty_or_oversized_array_is_400(api: Any, body: Any, code: str) -> None:
    app, _, _, key = api
    async with client(app) as c:
        r = await post(c, body, token(key))
    assert r.status_code == 400
    assert r.json()["details"][0]["error"][0]["code"] == code
    assert r.json()["details"][0]["error"][0]["path"] == []


async def test_hundred_items_are_accepted(api: Any) -> None:
    app, _, _, key = api
    async with client(app) as c:
        r = await post(c, [SEED_SINGLE] * 100, token(key))
    assert r.status_code == 202 and r.json()["acceptedCount"] == 100


@pytest.mark.parametrize("extra", [{"id": "mine"}, {"subject": {"id": "someone-else"}}])
async def test_client_cannot_send_id_or_subject(api: Any, extra: dict[str, Any]) -> None:
    app, _, _, key = api
    async with client(app) as c:
        r = await post(c, {**SEED_SINGLE, **extra}, token(key))
    assert r.status_code == 400
    [issue] = r.json()["details"][0]["error"]
    assert issue["code"] == "unrecognized_keys" and issue["keys"] == list(extra)


async def test_each_item_is_validated_independently(api: Any) -> None:
    app, _, _, key = api
    items = [SEED_SINGLE] * 9 + [{"contacts": [{"type": "email", "value": "nope"}], "message": "x"}]
    async with client(app) as c:
        r = await post(c, items, token(key))
    assert r.status_code == 207
    assert r.json()["acceptedCount"] == 9
    assert r.json()["details"][9]["error"][0]["code"] == "invalid_string"


async def test_english_messages_on_request(api: Any) -> None:
    app, _, _, key = api
    async with client(app) as c:
        r = await post(c, [SEED_SINGLE, SEED_BAD], token(key), **{"accept-language": "en-US"})
    assert r.json()["message"] == "Notifications partially accepted: 1 accepted, 1 rejected"


@pytest.mark.parametrize("tok", [None, "garbage", "a.b.c"])
async def test_missing_or_invalid_token_is_401(api: Any, tok: str | None) -> None:
    app, _, _, _ = api
    async with client(app) as c:
        r = await post(c, SEED_SINGLE, tok)
    assert r.status_code == 401
    assert r.json()["error"] == "HTTP 401 Unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_expired_token_is_401_and_missing_role_is_403(api: Any) -> None:
    app, _, _, key = api
    async with client(app) as c:
        expired = await post(c, SEED_SINGLE, token(key, ttl_s=-3600))
        norole = await post(c, SEED_SINGLE, token(key, roles=["user"]))
    assert expired.status_code == 401 and expired.json()["code"] == "token_expired"
    assert norole.status_code == 403 and norole.json()["error"] == "HTTP 403 Forbidden"


async def test_non_json_and_wrong_content_type_are_400(api: Any) -> None:
    app, _, _, key = api
    h = {"authorization": f"Bearer {token(key)}"}
    async with client(app) as c:
        r1 = await c.post("/v1/notifications", content=b"{not json",
                          headers={**h, "content-type": "application/json"})
        r2 = await c.post("/v1/notifications", content=json.dumps(SEED_SINGLE).encode(),
                          headers={**h, "content-type": "text/plain"})
    assert r1.status_code == 400 and r1.json()["error"] == "HTTP 400 Bad Request"
    assert r2.status_code == 400


async def test_body_over_the_limit_is_413(db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    app, _, _, key = await build_api(db_pool, tmp_path, max_request_bytes=1000)
    async with client(app) as c:
        r = await post(c, {**SEED_SINGLE, "message": "x" * 2000}, token(key))
    assert r.status_code == 413
    assert r.json()["error"] == "HTTP 413 Request Entity Too Large"


class SlowStore:
    async def accept(self, drafts: Any) -> None:
        await asyncio.sleep(30)


class BrokenStore:
    async def accept(self, drafts: Any) -> None:
        raise ConnectionError("database is gone")


async def test_slow_processing_is_504(db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    app, _, _, key = await build_api(db_pool, tmp_path, store=SlowStore(), request_timeout_s=0.2)
    async with client(app) as c:
        r = await post(c, SEED_SINGLE, token(key))
    assert r.status_code == 504
    assert r.json() == {"error": "HTTP 504 Gateway Timeout", "code": "timeout",
                        "message": "Превышено время обработки запроса"}


async def test_dependency_failure_is_500(db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    app, _, _, key = await build_api(db_pool, tmp_path, store=BrokenStore())
    async with client(app) as c:
        r = await post(c, SEED_SINGLE, token(key))
    assert r.status_code == 500
    assert r.json()["error"] == "HTTP 500 Internal Server Error"


async def test_unknown_path_is_json_404(api: Any) -> None:
    app, _, _, _ = api
    async with client(app) as c:
        r = await c.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_access_log_is_structured_json(api: Any, caplog: pytest.LogCaptureFixture) -> None:
    app, _, _, key = api
    with caplog.at_level(logging.INFO, logger="conveyor.access"):
        async with client(app) as c:
            r = await post(c, SEED_SINGLE, token(key), **{"x-request-id": "trace-42"})
    assert r.headers["x-trace-id"] == "trace-42"
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "conveyor.access"]
    assert lines[-1]["method"] == "POST" and lines[-1]["path"] == "/v1/notifications"
    assert lines[-1]["status"] == 202 and lines[-1]["traceId"] == "trace-42"
    assert lines[-1]["durationMs"] >= 0


async def test_idempotency_key_replays_and_refuses_reuse(api: Any, db_pool: asyncpg.Pool) -> None:
    app, api_obj, handle, key = api
    tok = token(key)
    async with client(app) as c:
        first = await post(c, SEED_FULL, tok, **{"idempotency-key": "k-1"})
        again = await post(c, SEED_FULL, tok, **{"idempotency-key": "k-1"})
        other = await post(c, SEED_SINGLE, tok, **{"idempotency-key": "k-1"})
        # another subject has its own key space
        theirs = await post(c, SEED_FULL, token(key, user="user-456"), **{"idempotency-key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotency-replayed"] == "true"
    assert other.status_code == 422
    assert theirs.status_code == 202
    assert await db_pool.fetchval("SELECT count(*) FROM notifications") == 2
    await asyncio.sleep(0)
    assert len(handle.kicked) == 2  # one hand-off per accepted request, none for the replay
    # in flight: another request holds the key
    from deployments.notifications import request_hash

    same = request_hash(json.dumps(SEED_SINGLE).encode())
    await api_obj.store.idempotency_begin("user-123", "k-2", same, 3600, 60)
    async with client(app) as c:
        busy = await post(c, SEED_SINGLE, tok, **{"idempotency-key": "k-2"})
    assert busy.status_code == 409


async def test_failed_request_releases_its_idempotency_key(db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    app, _, _, key = await build_api(db_pool, tmp_path, store=BrokenStore())
    async with client(app) as c:
        r = await post(c, SEED_SINGLE, token(key), **{"idempotency-key": "k-3"})
    assert r.status_code == 500
    assert await db_pool.fetchval("SELECT count(*) FROM notification_idempotency") == 0


async def test_get_shows_state_only_to_its_subject(api: Any) -> None:
    app, _, _, key = api
    async with client(app) as c:
        r = await post(c, SEED_FULL, token(key))
        nid = r.json()["details"][0]["notification"]["id"]
        mine = await c.get(f"/v1/notifications/{nid}", headers={"authorization": f"Bearer {token(key)}"})
        other = await c.get(f"/v1/notifications/{nid}",
                            headers={"authorization": f"Bearer {token(key, user='intruder')}"})
        bogus = await c.get("/v1/notifications/not-a-uuid",
                            headers={"authorization": f"Bearer {token(key)}"})
        anon = await c.get(f"/v1/notifications/{nid}")
    assert mine.status_code == 200
    got = mine.json()
    assert got["id"] == nid and got["state"] == "accepted"
    assert [ch["status"] for ch in got["channels"]] == ["pending", "pending"]
    assert other.status_code == 404 and bogus.status_code == 404 and anon.status_code == 401


async def test_openapi_document_is_valid_and_has_one_of_and_discriminator(api: Any) -> None:
    app, _, _, _ = api
    async with client(app) as c:
        doc = (await c.get("/openapi.json")).json()
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    body = doc["paths"]["/v1/notifications"]["post"]["requestBody"]["content"]["application/json"]
    assert len(body["schema"]["oneOf"]) == 2
    assert doc["components"]["schemas"]["Contact"]["discriminator"]["propertyName"] == "type"
    assert body["examples"]["array"]["value"] == SEED_ARRAY
    assert set(doc["paths"]["/v1/notifications"]["post"]["responses"]) >= {
        "202", "207", "400", "401", "500", "504"}
    for name in ("IncomingNotification", "Notification", "Contact"):
        assert name in doc["components"]["schemas"]


async def test_swagger_ui_is_served_from_local_assets(api: Any) -> None:
    app, _, _, _ = api
    async with client(app) as c:
        page = await c.get("/api-docs")
        refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assets = [await c.get(ref) for ref in refs]
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert refs and all(ref.startswith("/api-docs/") for ref in refs)
    assert all(a.status_code == 200 and a.content for a in assets)
