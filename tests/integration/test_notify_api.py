"""POST/GET /v1/notifications, docs and middleware through httpx.ASGITransport on the
routes the gateway mounts, against a real PostgreSQL. The seed's examples and rules are
contract tests here."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from openapi_spec_validator import validate

from adapters.auth import JwksKeys, JwtVerifier
from adapters.postgres.notifications import NotificationsStore
from tests.integration.notify_helpers import (
    ISSUER,
    Key,
    build_api,
    client,
    free_port,
    jwks_server,
    token,
)

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
    assert set(issue) == {"code", "message", "path"}  # exactly the seed's shape
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
    assert fail["error"][0] == SEED_TOO_SMALL
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
    assert d["error"] == [SEED_TOO_SMALL, {"code": "too_small", "path": ["message"],
                                           "message": "String must contain at least 1 character(s)"}]
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
    assert issue == {"code": "unrecognized_keys", "path": [],
                     "message": f"Unrecognized key(s) in object: '{next(iter(extra))}'"}


async def test_each_item_is_validated_independently(api: Any) -> None:
    app, _, _, key = api
    items = [SEED_SINGLE] * 9 + [{"contacts": [{"type": "email", "value": "nope"}], "message": "x"}]
    async with client(app) as c:
        r = await post(c, items, token(key))
    assert r.status_code == 207
    assert r.json()["acceptedCount"] == 9
    assert r.json()["details"][9]["error"] == [
        {"code": "invalid_string", "message": "Invalid email", "path": ["contacts", 0, "value"]}]


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
    async def accept(self, drafts: Any, idempotency: Any = None) -> None:
        await asyncio.sleep(30)


class BrokenStore:
    async def accept(self, drafts: Any, idempotency: Any = None) -> None:
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
    from deployments.notifications.api import request_hash

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


# --- body limit: chunked bodies -------------------------------------------------------------
async def chunks(data: bytes, size: int = 256) -> Any:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def test_chunked_body_over_the_limit_is_413_not_500(db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    app, _, _, key = await build_api(db_pool, tmp_path, max_request_bytes=1000)
    big = json.dumps({**SEED_SINGLE, "message": "x" * 5000}).encode()
    small = json.dumps(SEED_SINGLE).encode()
    h = {"content-type": "application/json", "authorization": f"Bearer {token(key)}"}
    async with client(app) as c:
        r = await c.post("/v1/notifications", content=chunks(big), headers=h)
        ok = await c.post("/v1/notifications", content=chunks(small, 16), headers=h)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in r.request.headers
    assert r.status_code == 413
    assert r.json() == {"error": "HTTP 413 Request Entity Too Large", "code": "too_large",
                        "message": "Тело запроса слишком велико"}
    assert ok.status_code == 202  # a chunked body within the limit reaches the API whole
    assert await db_pool.fetchval("SELECT count(*) FROM notifications") == 1


# --- idempotency: the key's response is stored with the notifications -----------------------
class FinishFails(NotificationsStore):
    """The database is unreachable for anything after the accept transaction."""

    async def idempotency_finish(self, *a: Any, **kw: Any) -> bool:
        raise ConnectionError("database is gone")

    async def idempotency_release(self, *a: Any, **kw: Any) -> None:
        raise ConnectionError("database is gone")


class FailsAfterCommit(NotificationsStore):
    """The accept commits, then the request fails (the connection dropped on the reply)."""

    async def accept(self, drafts: Any, idempotency: Any = None) -> None:
        await super().accept(drafts, idempotency)
        raise ConnectionResetError("connection lost after commit")


class SlowAfterCommit(NotificationsStore):
    """The accept commits, then the request runs out of time (504: it is cancelled)."""

    async def accept(self, drafts: Any, idempotency: Any = None) -> None:
        await super().accept(drafts, idempotency)
        await asyncio.sleep(30)


async def stored_ids(db_pool: asyncpg.Pool) -> list[str]:
    return [str(r["id"]) for r in await db_pool.fetch("SELECT id FROM notifications ORDER BY id")]


async def test_a_replay_after_a_failed_finish_does_not_send_again(db_pool: asyncpg.Pool,
                                                                  tmp_path: Path) -> None:
    app, _, handle, key = await build_api(db_pool, tmp_path, store=FinishFails(db_pool))
    async with client(app) as c:
        first = await post(c, SEED_FULL, token(key), **{"idempotency-key": "k-finish"})
        again = await post(c, SEED_FULL, token(key), **{"idempotency-key": "k-finish"})
    assert first.status_code == 202
    assert again.status_code == 202 and again.headers["idempotency-replayed"] == "true"
    assert again.json() == first.json()
    assert await stored_ids(db_pool) == [first.json()["details"][0]["notification"]["id"]]
    await asyncio.sleep(0)
    assert len(handle.kicked) == 1


async def test_a_failure_after_the_commit_replays_the_stored_response(db_pool: asyncpg.Pool,
                                                                       tmp_path: Path) -> None:
    app, _, _, key = await build_api(db_pool, tmp_path, store=FailsAfterCommit(db_pool))
    async with client(app) as c:
        first = await post(c, SEED_FULL, token(key), **{"idempotency-key": "k-crash"})
        again = await post(c, SEED_FULL, token(key), **{"idempotency-key": "k-crash"})
    assert first.status_code == 500  # the client never saw the 202...
    assert again.status_code == 202 and again.headers["idempotency-replayed"] == "true"
    # ...and its retry gets the response of what was stored, not a second notification
    [nid] = await stored_ids(db_pool)
    assert again.json()["details"][0]["notification"]["id"] == nid
    assert await db_pool.fetchval("SELECT count(*) FROM notification_outbox") == 1


async def test_a_timeout_after_the_commit_replays_the_stored_response(db_pool: asyncpg.Pool,
                                                                      tmp_path: Path) -> None:
    app, _, handle, key = await build_api(db_pool, tmp_path, store=SlowAfterCommit(db_pool),
                                          request_timeout_s=3.0)
    async with client(app) as c:
        first = await post(c, SEED_ARRAY, token(key), **{"idempotency-key": "k-504"})
        again = await post(c, SEED_ARRAY, token(key), **{"idempotency-key": "k-504"})
    assert first.status_code == 504
    assert again.status_code == 202 and again.headers["idempotency-replayed"] == "true"
    ids = await stored_ids(db_pool)
    assert len(ids) == 2
    assert sorted(d["notification"]["id"] for d in again.json()["details"]) == ids
    assert handle.kicked == []  # the replay hands nothing to the dispatcher


async def test_a_request_whose_key_was_taken_over_stores_nothing(db_pool: asyncpg.Pool) -> None:
    from stages.notifications import IdempotencyLost, IdempotencyRecord, NotificationDraft

    store = NotificationsStore(db_pool)
    old = await store.idempotency_begin("u", "k", "h", 3600, lease_s=-1)  # then it hung
    new = await store.idempotency_begin("u", "k", "h", 3600, lease_s=60)  # taken over
    assert old.outcome == new.outcome == "new" and old.claim != new.claim
    draft = NotificationDraft(str(uuid.uuid4()), "u", None, [{"type": "bitrix", "value": 1}], "m",
                              True, "send_to_first_available", 0.0)
    assert old.claim is not None and new.claim is not None
    with pytest.raises(IdempotencyLost):
        await store.accept([draft], IdempotencyRecord("u", "k", old.claim, 202, b"{}"))
    assert await db_pool.fetchval("SELECT count(*) FROM notifications") == 0
    await store.accept([draft], IdempotencyRecord("u", "k", new.claim, 202, b'{"n":1}'))
    replay = await store.idempotency_begin("u", "k", "h", 3600, 60)
    assert (replay.outcome, replay.status, replay.body) == ("replay", 202, b'{"n":1}')
    # a late release by the request that lost the key frees nothing
    await store.idempotency_release("u", "k", old.claim)
    assert (await store.idempotency_begin("u", "k", "h", 3600, 60)).outcome == "replay"


async def test_an_all_invalid_request_with_a_key_is_replayed(api: Any, db_pool: asyncpg.Pool) -> None:
    app, _, _, key = api
    async with client(app) as c:
        first = await post(c, SEED_BAD, token(key), **{"idempotency-key": "k-400"})
        again = await post(c, SEED_BAD, token(key), **{"idempotency-key": "k-400"})
    assert first.status_code == again.status_code == 400
    assert again.headers["idempotency-replayed"] == "true" and again.json() == first.json()


# --- readiness ------------------------------------------------------------------------------
async def test_ready_when_every_dependency_answers(api: Any) -> None:
    app, _, _, _ = api
    async with client(app) as c:
        r = await c.get("/health/ready")
    assert r.status_code == 200, r.text
    checks = r.json()["checks"]
    assert {"database", "mail_dir", "notification_dispatcher"} <= set(checks)
    assert "jwks" not in checks and "smtp" not in checks  # dev key, .eml files
    assert all(c["status"] == "up" for c in checks.values())


async def test_not_ready_with_detail_when_smtp_is_down(db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    app, _, _, _ = await build_api(db_pool, tmp_path, smtp_host="127.0.0.1", smtp_port=free_port(),
                                   smtp_timeout_s=2)
    async with client(app) as c:
        r = await c.get("/health/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["smtp"]["status"] == "down" and body["checks"]["smtp"]["error"]
    assert body["checks"]["database"]["status"] == "up"
    assert body["checks"]["notification_dispatcher"]["status"] == "up"


async def test_not_ready_when_the_mail_folder_cannot_be_written(db_pool: asyncpg.Pool,
                                                                 tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the mail folder should be")
    app, _, _, _ = await build_api(db_pool, tmp_path, mail_dir=blocker / "mail")
    async with client(app) as c:
        r = await c.get("/health/ready")
    assert r.status_code == 503
    assert r.json()["checks"]["mail_dir"]["status"] == "down"
    assert r.json()["checks"]["database"]["status"] == "up"


async def test_not_ready_when_the_jwks_is_unreachable(db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    keys = JwksKeys(f"http://127.0.0.1:{free_port()}/certs", min_refetch_s=0)
    verifier = JwtVerifier(issuer=ISSUER, audience="conveyor", client_id="conveyor", jwks=keys)
    app, _, _, _ = await build_api(db_pool, tmp_path, verifier=verifier)
    async with client(app) as c:
        r = await c.get("/health/ready")
    assert r.status_code == 503
    assert r.json()["checks"]["jwks"]["status"] == "down"
    assert "signing keys are unavailable" in r.json()["checks"]["jwks"]["error"]


# --- authentication over HTTP: a JWKS server, messages in the client's language ----------------
@pytest.fixture
async def keycloak(db_pool: asyncpg.Pool, tmp_path: Path) -> Any:
    async with jwks_server() as (srv, url, key):
        verifier = JwtVerifier(issuer=ISSUER, audience="conveyor", client_id="conveyor",
                               jwks=JwksKeys(url, min_refetch_s=0))
        app, _, _, _ = await build_api(db_pool, tmp_path, verifier=verifier)
        yield app, srv, key


async def test_keycloak_token_via_jwks_is_accepted_with_its_subject(keycloak: Any) -> None:
    app, srv, key = keycloak
    async with client(app) as c:
        r = await post(c, SEED_SINGLE, key.sign())
        nid = r.json()["details"][0]["notification"]["id"]
        got = await c.get(f"/v1/notifications/{nid}", headers={"authorization": f"Bearer {key.sign()}"})
        ready = await c.get("/health/ready")
    assert r.status_code == 202
    assert r.json()["details"][0]["notification"]["subject"] == {"id": "user-123", "name": "John Doe"}
    assert got.status_code == 200 and got.json()["subject"]["id"] == "user-123"
    assert ready.json()["checks"]["jwks"]["status"] == "up"
    assert srv.fetches == 1  # cached


async def test_auth_errors_speak_russian_by_default_and_english_on_request(keycloak: Any) -> None:
    app, _, key = keycloak
    stranger = Key("k9")
    async with client(app) as c:
        missing = await post(c, SEED_SINGLE, None)
        unknown = await post(c, SEED_SINGLE, stranger.sign())
        expired = await post(c, SEED_SINGLE, key.sign(exp=int(time.time()) - 3600))
        expired_en = await post(c, SEED_SINGLE, key.sign(exp=int(time.time()) - 3600),
                                **{"accept-language": "en"})
        norole = await post(c, SEED_SINGLE, key.sign(resource_access=None))
        norole_en = await post(c, SEED_SINGLE, key.sign(resource_access=None),
                               **{"accept-language": "en-GB,en;q=0.9"})
    assert missing.status_code == 401 and missing.json()["code"] == "missing_token"
    assert missing.json()["message"] == "Требуется JWT-токен в заголовке Authorization: Bearer <JWT>"
    assert unknown.status_code == 401 and unknown.json()["message"] == "Токен подписан неизвестным ключом"
    assert expired.json() == {"error": "HTTP 401 Unauthorized", "code": "token_expired",
                              "message": "Срок действия токена истёк"}
    assert expired_en.json()["message"] == "The token has expired"
    assert norole.status_code == 403 and norole.json() == {
        "error": "HTTP 403 Forbidden", "code": "forbidden",
        "message": "Требуется роль 'notifications:send'"}
    assert norole_en.json()["message"] == "Role 'notifications:send' is required"


async def test_jwks_unavailable_is_a_server_error_in_the_seed_shape(db_pool: asyncpg.Pool,
                                                                      tmp_path: Path) -> None:
    keys = JwksKeys(f"http://127.0.0.1:{free_port()}/certs", min_refetch_s=30)
    verifier = JwtVerifier(issuer=ISSUER, audience="conveyor", client_id="conveyor", jwks=keys)
    app, _, _, _ = await build_api(db_pool, tmp_path, verifier=verifier)
    async with client(app) as c:
        first = await post(c, SEED_SINGLE, Key("k1").sign())
        second = await post(c, SEED_SINGLE, Key("k1").sign())
    for r in (first, second):
        assert r.status_code == 500
        assert r.json() == {"error": "HTTP 500 Internal Server Error", "code": "jwks_unavailable",
                            "message": "Ключи проверки подписи токенов недоступны, повторите запрос позже"}
        assert "www-authenticate" not in r.headers
    assert keys.fetches == 1  # the second request did not wait for a fetch of its own


# --- limits are settings ----------------------------------------------------------------------
async def test_limits_come_from_settings_and_the_document_says_so(db_pool: asyncpg.Pool,
                                                                   tmp_path: Path) -> None:
    app, _, _, key = await build_api(db_pool, tmp_path, notification_max_contacts=2,
                                     notification_max_message_chars=10)
    item = {"contacts": [{"type": "bitrix", "value": 1}] * 3, "message": "x" * 11}
    async with client(app) as c:
        r = await post(c, item, token(key))
        doc = (await c.get("/openapi.json")).json()
    assert r.status_code == 400
    assert r.json()["details"][0]["error"] == [
        {"code": "too_big", "message": "List must contain at most 2 element(s)", "path": ["contacts"]},
        {"code": "too_big", "message": "String must contain at most 10 character(s)", "path": ["message"]}]
    props = doc["components"]["schemas"]["IncomingNotification"]["properties"]
    assert props["contacts"]["maxItems"] == 2 and props["message"]["maxLength"] == 10


# --- the documented examples are what the server answers ------------------------------------
def schema_validator(doc: dict[str, Any], ref: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator({"$ref": ref, "components": doc["components"]})


def placeholders(value: Any) -> Any:
    """Server-made values (notification ids, createdAt) → placeholders, after checking
    their form; everything else is compared as is."""
    if isinstance(value, list):
        return [placeholders(v) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "id" and isinstance(v, str) and "createdAt" in value:
                assert UUID4.match(v), v
                out[k] = "<uuid4>"
            elif k == "createdAt":
                assert CREATED.match(v), v
                out[k] = "<createdAt>"
            else:
                out[k] = placeholders(v)
        return out
    return value


async def test_every_documented_example_is_what_the_server_answers(api: Any) -> None:
    app, _, _, key = api
    async with client(app) as c:
        doc = (await c.get("/openapi.json")).json()
        op = doc["paths"]["/v1/notifications"]["post"]
        requests = op["requestBody"]["content"]["application/json"]["examples"]
        documented = {name: (status, ex["value"], content["schema"]["$ref"])
                      for status, resp in op["responses"].items()
                      for content in [resp["content"]["application/json"]]
                      for name, ex in content.get("examples", {}).items()}
        assert set(requests) == set(documented) >= {"single", "full", "array", "partial", "invalid"}
        request_schema = schema_validator(doc, "#/components/schemas/IncomingNotification")
        for name, example in requests.items():
            status, expected, ref = documented[name]
            r = await post(c, example["value"], token(key))  # subject {"id": "user-123"}
            assert r.status_code == int(status), (name, r.text)
            assert placeholders(r.json()) == placeholders(expected), name
            # both the real answer and the documented one fit the documented schema
            schema_validator(doc, ref).validate(r.json())
            schema_validator(doc, ref).validate(expected)
            items = example["value"] if isinstance(example["value"], list) else [example["value"]]
            valid = [request_schema.is_valid(i) for i in items]
            if status == "202":
                assert all(valid), name  # accepted examples fit the request schema
            else:
                assert not all(valid), name  # the rejected ones show what the schema refuses
    # the seed's own examples are among them, to the letter
    assert requests["single"]["value"] == SEED_SINGLE and requests["array"]["value"] == SEED_ARRAY
    assert requests["full"]["value"] == SEED_FULL
    seed_207 = documented["partial"][1]
    assert seed_207["message"] == "Уведомления приняты частично: 2 принято, 1 отклонено"
    assert seed_207["details"][-1]["notification"] == SEED_BAD
    assert seed_207["details"][-1]["error"][0] == SEED_TOO_SMALL
    assert documented["invalid"][1]["details"][0]["error"][0] == SEED_TOO_SMALL


async def test_the_issue_schema_refuses_extra_keys(api: Any) -> None:
    app, _, _, _ = api
    async with client(app) as c:
        doc = (await c.get("/openapi.json")).json()
    v = schema_validator(doc, "#/components/schemas/ValidationIssue")
    assert v.is_valid(SEED_TOO_SMALL)
    assert not v.is_valid({**SEED_TOO_SMALL, "minimum": 1})
