"""The wiring of Kafka and Redis, without servers: the cache stage, what ingress records
become, when the ingress pauses and resumes, soft readiness checks, and the graph."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.testclient import TestClient

from deployments.gateway.health_api import HealthApi
from stages.bus import CacheUnavailable, IngressRecord
from stages.cache import CacheChat, stored_row
from stages.feedback import PaceConfig, Pacer
from stages.ingress import IngressPace, chat_envelope, notification_envelope, system_delivery
from stages.model import Envelope, Verdict
from stages.ports import StoredMessage
from tests.fakes import FakeOutages


class ListCache:
    def __init__(self, fail: bool = False) -> None:
        self.rows: list[StoredMessage] = []
        self.fail = fail

    async def append(self, rows: Sequence[StoredMessage]) -> None:
        if self.fail:
            raise CacheUnavailable("down")
        self.rows.extend(rows)


def persisted(seq: int, duplicate: bool = False) -> Envelope:
    return Envelope(type="chat", id=f"c{seq}", sender="alice",
                    fields={"chatId": "chat-1", "body": f"hi {seq}"},
                    meta={"messageId": f"m{seq}", "chatId": "chat-1", "seq": seq,
                          "createdAt": "2026-11-30T00:00:00.000Z", "duplicate": duplicate})


async def test_cache_stage_appends_new_rows_and_skips_duplicates() -> None:
    cache = ListCache()
    out = await CacheChat(cache).process([persisted(1), persisted(2, duplicate=True)])
    assert [o.verdict for o in out] == [Verdict.CONTINUE, Verdict.CONTINUE]
    assert [(r.seq, r.body, r.sender_id) for r in cache.rows] == [(1, "hi 1", "alice")]


async def test_cache_stage_reports_redis_down_and_lets_the_batch_go_on() -> None:
    outages = FakeOutages()
    out = await CacheChat(ListCache(fail=True), outages).process([persisted(1)])
    assert out[0].verdict is Verdict.CONTINUE
    assert outages.reports == [("redis", "cache_chat", 1)]


async def test_cache_stage_without_a_cache_passes_everything_on() -> None:
    out = await CacheChat(None).process([persisted(1)])
    assert out[0].verdict is Verdict.CONTINUE


def test_a_command_becomes_the_row_the_store_wrote() -> None:
    env = Envelope(type="command", id="k1", sender="alice",
                   fields={"op": "react", "messageId": "m1", "emoji": "ok"},
                   meta={"messageId": "e1", "chatId": "chat-1", "seq": 3,
                         "createdAt": "2026-11-30T00:00:00.000Z", "duplicate": False,
                         "commandData": {"emoji": "ok", "added": True}})
    row = stored_row(env)
    assert row is not None
    assert (row.kind, row.target, row.data, row.body) == ("react", "m1",
                                                          {"emoji": "ok", "added": True}, None)


def record(type_: str, fields: dict[str, Any], raw: dict[str, Any] | None = None) -> IngressRecord:
    return IngressRecord(type_, "r1", fields, "conveyor.ingress", 0, 7,
                         raw=orjson.dumps(raw) if raw is not None else None)


def test_ingress_records_become_pipeline_work() -> None:
    d = system_delivery(record("system", {"to": ["bob"], "event": "maintenance", "data": {}}))
    assert d.users == ["bob"] and d.frame == {"type": "system", "event": "maintenance", "data": {}}
    env = chat_envelope(record("chat", {"chatId": "c", "senderId": "bot", "body": "hi"}))
    assert (env.type, env.id, env.sender, env.meta["cost"]) == ("chat", "r1", "bot", 0)
    raw = {"type": "notification", "id": "r1", "subject": "svc", "message": "m",
           "contacts": [{"type": "email", "value": "a@b.c"}]}
    n1 = notification_envelope(record("notification", {"subject": "svc", "item": {}}, raw))
    n2 = notification_envelope(record("notification", {"subject": "svc", "item": {}}, raw))
    assert n1.fields["notification"] == {k: v for k, v in raw.items()
                                         if k not in ("type", "id", "subject")}
    assert n1.meta["notificationId"] == n2.meta["notificationId"]  # a re-read is the same
    assert n1.meta["subject"] == {"id": "svc"}


def test_ingress_pauses_on_a_slow_hand_off_and_resumes_by_itself() -> None:
    now = [0.0]
    pace = IngressPace(Pacer(PaceConfig(min_interval_s=0.5, max_interval_s=4.0,
                                        saturated_backlog=100)), 1.0, clock=lambda: now[0])
    pace.observe(latency_s=0.1, backlog=0)
    assert not pace.saturated(0)
    pace.observe(latency_s=2.0, backlog=0)  # slow: pause
    assert pace.saturated(0) and pace.last_reason == "slow"
    now[0] += 1.1  # the pacer's interval passed: resume
    assert not pace.saturated(0)
    pace.observe(latency_s=0.0, backlog=0, refused=True)
    assert pace.saturated(0) and pace.last_reason == "refused"
    now[0] += 10
    assert not pace.saturated(0)
    assert pace.saturated(100)  # the hub's mailboxes past the mark


def test_soft_checks_show_degraded_without_failing_readiness() -> None:
    async def up() -> None:
        return None

    async def down() -> dict[str, Any]:
        raise ConnectionError("redis away")

    async def relay() -> dict[str, Any]:
        return {"status": "degraded", "pending": 3}

    api = HealthApi(lambda: {"database": up}, lambda: {"redis": down, "event_relay": relay})
    r = TestClient(Starlette(routes=api.routes())).get("/health/ready")
    assert r.status_code == 200
    checks = r.json()["checks"]
    assert checks["redis"]["status"] == "degraded" and "redis away" in checks["redis"]["error"]
    assert checks["event_relay"] == {"status": "degraded", "pending": 3}


def test_cache_chat_runs_on_the_host_of_persist_chat(tmp_path: Any) -> None:
    from serve_app.app import plan_hosts
    from settings import Settings

    # cache_chat runs on the host of persist_chat (same call), in every topology.
    hosts = plan_hosts(Settings(data_dir=tmp_path))
    assert hosts["cache_chat"] == hosts["persist_chat"]
    assert "cache_chat" in plan_hosts(Settings(data_dir=tmp_path), "split")
