"""Kafka and Redis wired into the running app (README, "Kafka and Redis").

A second Serve application in the session's Ray (its own database, under /bus) with
``kafka_bootstrap`` pointing at the suite's Kafka-protocol broker (Tansu) and ``redis_url``
at the suite's redis-server. Its chat pipeline has one extra stage that is slow while a
flag file exists, so a test can make the pipeline saturated and fast again.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from client import HttpClient, WsClient
from tests.conftest import E2E_SETTINGS, App, side_app
from tests.integration.kafka_helpers import read_topic, values

pytestmark = pytest.mark.e2e

APP_NAME = "bus"
ROOT = str(Path(__file__).resolve().parents[2])
SLOW_STAGE = "tests.e2e.slow_stage:SlowWhenFlagged"
SLOW_S = 1.5  # per batch while flagged: above kafka_ingress_pause_latency_s


def user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


README = Path(ROOT, "README.md")


def readme_snippet(i: int, bootstrap: str) -> str:
    """The i-th ``python - <<'PY'`` block of the README's "Kafka and Redis" section, with
    the suite's broker instead of 127.0.0.1:9092."""
    section = README.read_text().split("\n## Kafka and Redis\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"python - <<'PY'\n(.*?)\nPY\n", section, re.S)
    return str(blocks[i]).replace("127.0.0.1:9092", bootstrap)


def pipelines_with_slow_stage(flag: Path, out: Path) -> Path:
    """The shipped pipelines, with the slow stage right after validate_chat."""
    doc = yaml.safe_load(Path(ROOT, "serve_app", "pipelines.yaml").read_text())
    stages = doc["types"]["chat"]["stages"]
    at = next(i for i, s in enumerate(stages)
              if s == "validate_chat" or (isinstance(s, dict) and "validate_chat" in s))
    stages.insert(at + 1, {SLOW_STAGE: {"flag": str(flag), "delay_s": SLOW_S}})
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


class BusApp(App):
    topics: dict[str, str]
    flag: Path


@pytest.fixture(scope="module")
def bus_app(conveyor: App, new_database: Any, kafka_broker: Any, redis_server: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[BusApp]:
    work = tmp_path_factory.mktemp("bus")
    # The topics of PROTOCOL.md's names, made as the README makes them.
    topics = {"events": "conveyor.events", "ingress": "conveyor.ingress",
              "dlq": "conveyor.ingress.dlq"}
    made = subprocess.run([sys.executable, "-c", readme_snippet(0, kafka_broker.bootstrap)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    flag = work / "slow"
    settings = {**E2E_SETTINGS, "data_dir": str(conveyor.data_dir),
                "database_url": new_database("bus"), "mail_dir": str(work / "mail"),
                "kafka_bootstrap": kafka_broker.bootstrap, "redis_url": redis_server.url,
                "kafka_ingress_group": f"bus-{uuid.uuid4().hex[:6]}",
                "kafka_ingress_pause_latency_s": 1.0, "kafka_ingress_retry_s": 0.5,
                "event_relay_interval_s": 0.1,
                "event_relay_backoff_max_s": 2.0, "event_relay_lease_s": 20.0,
                "pipelines_file": str(pipelines_with_slow_stage(flag, work / "pipelines.yaml"))}
    # Every process of this app imports the slow stage from the repository's tests.
    small = {"ray_actor_options": {"num_cpus": 0.05,
                                   "runtime_env": {"env_vars": {"PYTHONPATH": ROOT}}}}
    options = {name: small for name in ("Gateway", "stages", "OutboxRelay",
                                        "NotificationDispatcher", "EventRelay", "KafkaIngress")}
    try:
        with side_app(conveyor, APP_NAME, settings, options=options) as side:
            app = BusApp(side.base_url, side.ws_url, side.dsn, side.data_dir, side.settings)
            app.topics, app.flag = topics, flag
            # The ingress consumer joins its group in the background: wait for it.
            joined = asyncio.run(until(lambda: _ingress_up(), 120, every=0.5))
            assert joined, "the ingress consumer did not start"
            yield app
    finally:
        flag.unlink(missing_ok=True)


@pytest.fixture
async def bus_db(bus_app: BusApp) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(bus_app.dsn)
    yield conn
    await conn.close()


async def until(pred: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    """Await ``pred()`` (sync or async) until truthy; its value, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(every)


async def produce(app: BusApp, records: list[dict[str, Any] | bytes], key: str | None = None
                  ) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=app.settings["kafka_bootstrap"], acks="all")
    await producer.start()
    try:
        for r in records:
            value = r if isinstance(r, bytes) else orjson.dumps(r)
            await producer.send_and_wait(app.topics["ingress"], value,
                                         key=key.encode() if key else None)
    finally:
        await producer.stop()


async def ingress_status(timeline: bool = True) -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("KafkaIngress", app_name=APP_NAME)
    return dict(await handle.status.remote(timeline=timeline))


async def _ingress_up() -> bool:
    return (await ingress_status(False))["status"] != "starting"


async def ready(app: BusApp) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=app.base_url, timeout=15) as http:
        r = await http.get("/health/ready")
    return r.status_code, r.json()


async def metric(app: BusApp, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(base_url=app.base_url, timeout=15) as http:
        text = (await http.get("/metrics")).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def chat_of(app: BusApp, a: str, b: str) -> str:
    async with HttpClient(app.base_url, app.token(a)) as http:
        return str((await http.create_chat([b]))["chatId"])


# --- event bus (out) ------------------------------------------------------------------
async def test_a_chat_messages_event_appears_on_the_events_topic(bus_app: BusApp) -> None:
    a, b = user(), user()
    chat = await chat_of(bus_app, a, b)
    async with await WsClient.connect(bus_app.ws_url, bus_app.token(a)) as ws:
        ack = await ws.ack(await ws.chat(chat, "hello, bus"), timeout=20)
    assert ack["status"] == "accepted"
    found = await until(lambda: _event_of(bus_app, ack["messageId"]), 30, every=0.5)
    assert found, "no event for the message on the events topic"
    key, event = found
    assert key == chat
    assert event["type"] == "message" and event["eventId"] == ack["messageId"]
    assert event["chatId"] == chat and event["senderId"] == a and event["body"] == "hello, bus"
    status, body = await ready(bus_app)
    assert status == 200
    relay = body["checks"]["event_relay"]
    assert relay["status"] == "ok" and "pending" in relay and "oldestAgeS" in relay, relay
    assert body["checks"]["kafka_ingress"]["status"] in ("ok", "paused"), body
    assert body["checks"]["redis"]["status"] == "up", body


async def _event_of(app: BusApp, message_id: str) -> tuple[str, dict[str, Any]] | None:
    records = await read_topic(app.settings["kafka_bootstrap"], app.topics["events"], 1,
                               timeout_s=3, settle_s=0.2)
    for r in records:
        v = orjson.loads(r.value)
        if v.get("messageId") == message_id and v.get("type") == "message":
            return r.key.decode(), v
    return None


async def test_the_readmes_snippets_show_an_event_and_deliver_a_system_record(
        bus_app: BusApp) -> None:
    bootstrap = bus_app.settings["kafka_bootstrap"]
    bob, alice = user(), user()
    chat = await chat_of(bus_app, alice, bob)
    async with await WsClient.connect(bus_app.ws_url, bus_app.token(bob)) as ws:
        producer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", readme_snippet(2, bootstrap).replace('["bob"]', f'["{bob}"]'),
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(producer.communicate(), 60)
        assert producer.returncode == 0, err.decode()
        frame = await ws.expect(lambda f: f["type"] == "system"
                                and f.get("event") == "maintenance", timeout=30)
        assert frame["data"] == {"at": "22:00"}
    async with await WsClient.connect(bus_app.ws_url, bus_app.token(alice)) as ws:
        ack = await ws.ack(await ws.chat(chat, "hi"), timeout=20)
    reader = await asyncio.create_subprocess_exec(
        sys.executable, "-u", "-c", readme_snippet(1, bootstrap), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        assert reader.stdout is not None
        async with asyncio.timeout(60):
            while True:
                line = (await reader.stdout.readline()).decode()
                assert line, "the README's consumer ended without printing the event"
                if ack["messageId"] in line:
                    break
        assert line.startswith(chat) and "'type': 'message'" in line
    finally:
        reader.kill()
        await reader.wait()


# --- Kafka ingress (in) ---------------------------------------------------------------
async def test_a_system_record_arrives_on_a_websocket(bus_app: BusApp) -> None:
    u = user()
    async with await WsClient.connect(bus_app.ws_url, bus_app.token(u)) as ws:
        await produce(bus_app, [{"type": "system", "id": uuid.uuid4().hex, "to": [u],
                                 "event": "maintenance", "data": {"at": "tonight"}}])
        frame = await ws.expect(lambda f: f["type"] == "system"
                                and f.get("event") == "maintenance", timeout=30)
    assert frame["data"] == {"at": "tonight"}


async def test_a_chat_record_is_posted_by_its_service_sender_once(bus_app: BusApp) -> None:
    bot, member = user(), user()
    chat = await chat_of(bus_app, bot, member)
    record = {"type": "chat", "id": uuid.uuid4().hex, "chatId": chat, "senderId": bot,
              "body": "from the bus"}
    async with await WsClient.connect(bus_app.ws_url, bus_app.token(member)) as ws:
        await produce(bus_app, [record, record], key=chat)  # the second is a repeat
        msg = await ws.message(chatId=chat, timeout=30)
    assert msg["senderId"] == bot and msg["body"] == "from the bus"
    await until(lambda: _accepted_at_least(2), 20)
    async with HttpClient(bus_app.base_url, bus_app.token(member)) as http:
        items = (await http.history(chat))["messages"]
    assert [m["body"] for m in items] == ["from the bus"]


async def _accepted_at_least(n: int) -> bool:
    return int((await ingress_status(False))["accepted"]) >= n


async def test_bad_records_land_on_the_dlq_with_their_reason(bus_app: BusApp) -> None:
    outsider, a, b = user(), user(), user()
    chat = await chat_of(bus_app, a, b)
    marker = uuid.uuid4().hex
    not_member = {"type": "chat", "id": marker, "chatId": chat, "senderId": outsider,
                  "body": "let me in"}
    await produce(bus_app, [f"not json {marker}".encode(), not_member,
                            {"type": "system", "id": marker, "to": [], "event": "x"}])
    letters = await until(lambda: _letters(bus_app, marker, 3), 40, every=0.5)
    assert letters, "the bad records did not reach the dead-letter topic"
    reasons = {lt["record"]: lt["reason"] for lt in letters}
    assert reasons[f"not json {marker}"].startswith("not JSON")
    assert reasons[orjson.dumps(not_member).decode()].startswith("forbidden")
    assert any("`to`" in r for r in reasons.values())
    assert all({"topic", "partition", "offset"} <= set(lt) for lt in letters)
    # The consumer moved on: a good record after them still arrives.
    u = user()
    async with await WsClient.connect(bus_app.ws_url, bus_app.token(u)) as ws:
        await produce(bus_app, [{"type": "system", "id": uuid.uuid4().hex, "to": [u],
                                 "event": "after-dlq", "data": {}}])
        await ws.expect(lambda f: f.get("event") == "after-dlq", timeout=30)


async def _letters(app: BusApp, marker: str, n: int) -> list[dict[str, Any]] | None:
    records = await read_topic(app.settings["kafka_bootstrap"], app.topics["dlq"], n,
                               timeout_s=3, settle_s=0.2)
    mine = [v for v in values(records) if marker in (v.get("record") or "")]
    return mine if len(mine) >= n else None


async def test_ingress_pauses_under_a_slow_stage_and_resumes_by_itself(bus_app: BusApp) -> None:
    bot, member = user(), user()
    chat = await chat_of(bus_app, bot, member)
    before = await ingress_status()
    paused_before = sum(1 for _, what, _ in before["timeline"] if what == "pause")
    accepted_before = int(before["accepted"])
    n = 40
    bus_app.flag.touch()
    try:
        for i in range(0, n, 5):  # a steady stream, several batches
            await produce(bus_app, [{"type": "chat", "id": f"slow-{chat}-{j}", "chatId": chat,
                                     "senderId": bot, "body": f"m{j}"} for j in range(i, i + 5)])
            await asyncio.sleep(0.3)
        # Show the pause: the status says paused while the pipeline is slow.
        seen_paused = await until(lambda: _paused(), 30, every=0.1)
        assert seen_paused, "the ingress never paused while the pipeline was slow"
        mid = await ingress_status()
        pauses = [e for e in mid["timeline"] if e[1] == "pause"]
        assert len(pauses) > paused_before
    finally:
        bus_app.flag.unlink(missing_ok=True)
    # Fast again: every record gets accepted and the partitions are resumed, by themselves.
    done = await until(lambda: _accepted_at_least(accepted_before + n), 90, every=0.5)
    assert done, f"not every record was accepted after the stage sped up: {await ingress_status(False)}"
    resumed = await until(lambda: _resumed(), 30, every=0.2)
    assert resumed, "the ingress did not resume"
    after = await ingress_status()
    last_pause = max(t for t, what, _ in after["timeline"] if what == "pause")
    assert any(what == "resume" and t >= last_pause for t, what, _ in after["timeline"])
    async with HttpClient(bus_app.base_url, bus_app.token(member)) as http:
        items = await http.history_all(chat)
    assert sorted(m["body"] for m in items) == sorted(f"m{j}" for j in range(n))


async def _paused() -> bool:
    return (await ingress_status(False))["status"] == "paused"


async def _resumed() -> bool:
    return (await ingress_status(False))["status"] == "ok"


# --- the chat cache (Redis) -----------------------------------------------------------
async def _store_view(dsn: str, chat: str, user_id: str) -> tuple[list[dict[str, Any]], int]:
    """History frames and the user's unread count, read from PostgreSQL directly."""
    from adapters.postgres.chats import PostgresChats
    from adapters.postgres.messages import PostgresMessages

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        rows = await PostgresMessages(pool).messages_after(chat, 0, 500)
        chats = await PostgresChats(pool).chats_of(user_id)
    finally:
        await pool.close()
    unread = next(c["unreadCount"] for c in chats if c["chatId"] == chat)
    return [m.frame() for m in rows], int(unread)


async def test_cache_and_database_agree_after_a_mix_of_commands(bus_app: BusApp) -> None:
    import random

    rng = random.Random(10)
    a, b = user(), user()
    chat = await chat_of(bus_app, a, b)
    mine: list[str] = []
    async with await WsClient.connect(bus_app.ws_url, bus_app.token(a)) as ws, \
            HttpClient(bus_app.base_url, bus_app.token(b)) as http_b:
        assert (await http_b.chats())[0]["unreadCount"] == 0  # fills b's counter
        for i in range(40):
            op = rng.choice(["chat"] * 4 + ["edit", "react", "react", "delete"])
            if op == "chat" or not mine:
                ack = await ws.ack(await ws.chat(chat, f"text {i}"), timeout=20)
                mine.append(ack["messageId"])
                continue
            target = rng.choice(mine)
            fields = {"body": f"edited {i}"} if op == "edit" else (
                {"emoji": rng.choice(["+1", "ok"])} if op == "react" else {})
            await ws.ack(await ws.command(op, target, **fields), timeout=20)
        api = await http_b.history_all(chat, page=100)
        store, unread = await _store_view(bus_app.dsn, chat, b)
        assert api == store
        listed = {c["chatId"]: c for c in await http_b.chats()}
        assert listed[chat]["unreadCount"] == unread
        # A read receipt moves the cached counter exactly.
        half = [m for m in api if m["type"] == "message"][len(mine) // 2]
        async with await WsClient.connect(bus_app.ws_url, bus_app.token(b)) as ws_b:
            await ws_b.receipt([half["messageId"]], "read")
            await until(lambda: _read_moved(http_b, chat), 10)
        listed = {c["chatId"]: c for c in await http_b.chats()}
        assert listed[chat]["unreadCount"] == (await _store_view(bus_app.dsn, chat, b))[1]
    assert await metric(bus_app, "conveyor_cache_reads_total", result="hit") > 0


async def _read_moved(http: HttpClient, chat: str) -> bool:
    listed = {c["chatId"]: c for c in await http.chats()}
    return bool(listed[chat]["readSeq"] > 0)


async def test_redis_down_history_is_still_served_and_health_degraded_then_back(
        bus_app: BusApp, redis_server: Any) -> None:
    a, b = user(), user()
    chat = await chat_of(bus_app, a, b)
    async with await WsClient.connect(bus_app.ws_url, bus_app.token(a)) as ws:
        for i in range(3):
            await ws.ack(await ws.chat(chat, f"before {i}"), timeout=20)
        redis_server.stop()
        try:
            ack = await ws.ack(await ws.chat(chat, "while redis is down"), timeout=20)
            assert ack["status"] == "accepted"
            async with HttpClient(bus_app.base_url, bus_app.token(b)) as http:
                items = await http.history_all(chat)
                assert [m["body"] for m in items] == [
                    "before 0", "before 1", "before 2", "while redis is down"]
                assert (await http.chats())[0]["unreadCount"] == 4
            status, body = await ready(bus_app)
            assert status == 200 and body["status"] == "ready"
            assert body["checks"]["redis"]["status"] == "degraded"
            down = await until(lambda: _cache_gauge(bus_app, 0.0), 15, every=0.5)
            assert down, "conveyor_cache_available did not drop to 0"
        finally:
            redis_server.start()
        status, body = await ready(bus_app)
        assert status == 200 and body["checks"]["redis"]["status"] == "up"
        await ws.ack(await ws.chat(chat, "after"), timeout=20)
    async with HttpClient(bus_app.base_url, bus_app.token(b)) as http:
        first = await http.history_all(chat)
        again = await http.history_all(chat)  # from the cache, filled by the first read
    store, _ = await _store_view(bus_app.dsn, chat, b)
    assert first == again == store
    assert await until(lambda: _cache_gauge(bus_app, 1.0), 15, every=0.5)


async def _cache_gauge(app: BusApp, want: float) -> bool:
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(base_url=app.base_url, timeout=15) as http:
        text = (await http.get("/metrics")).text
    values_ = [s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "conveyor_cache_available"]
    return bool(values_) and all(v == want for v in values_)


# --- the broker down: chat goes on, the relay says degraded, events follow later ------
async def test_broker_down_delays_events_not_chat(bus_app: BusApp, kafka_broker: Any) -> None:
    a, b = user(), user()
    chat = await chat_of(bus_app, a, b)
    async with await WsClient.connect(bus_app.ws_url, bus_app.token(a)) as ws:
        kafka_broker.stop()
        try:
            t0 = time.monotonic()
            ack = await ws.ack(await ws.chat(chat, "while the broker is down"), timeout=20)
            assert ack["status"] == "accepted" and time.monotonic() - t0 < 5
            degraded = await until(lambda: _relay_degraded(bus_app), 40, every=0.5)
            assert degraded, "the relay never reported degraded"
            status, body = degraded
            assert status == 200 and body["checks"]["event_relay"]["pending"] >= 1
            assert await metric(bus_app, "conveyor_event_relay_degraded") >= 0  # exported
        finally:
            kafka_broker.start()
    found = await until(lambda: _event_of(bus_app, ack["messageId"]), 60, every=1.0)
    assert found, "the event was not published after the broker came back"
    ok = await until(lambda: _relay_ok(bus_app), 30, every=0.5)
    assert ok


async def _relay_degraded(app: BusApp) -> tuple[int, dict[str, Any]] | None:
    status, body = await ready(app)
    return (status, body) if body["checks"]["event_relay"]["status"] == "degraded" else None


async def _relay_ok(app: BusApp) -> bool:
    _, body = await ready(app)
    return bool(body["checks"]["event_relay"]["status"] == "ok")

