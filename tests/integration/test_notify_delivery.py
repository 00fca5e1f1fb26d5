"""The outbox store against real PostgreSQL, the SMTP channel against an aiosmtpd server,
the Bitrix24 channel against a local HTTP server speaking Bitrix's wire format, and the
dispatch engine over all three."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from email import message_from_bytes
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from adapters.bitrix import BitrixChannel, TokenBucket
from adapters.mailfiles import MailDirChannel
from adapters.postgres.notifications import NotificationsStore
from adapters.smtp import SmtpChannel
from deployments.notifications.engine import DispatchEngine
from stages.notifications import (
    Attempt,
    CircuitBreaker,
    ContactProgress,
    ContactStatus,
    Delivery,
    FinalState,
    GuardedChannel,
    NotificationDraft,
    RetryPolicy,
    RoundResult,
    SendResult,
    SendStatus,
    dispatch_round,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- SMTP server -------------------------------------------------------------------------
class Sink:
    """aiosmtpd handler: keeps what it received; refuses some recipients on purpose."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.sessions: set[int] = set()
        self.delay_s = 0.0  # each message takes this long before the server accepts it

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: Any) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 No such user"
        if address.startswith("busy@"):
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sessions.add(id(session))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted"


@pytest.fixture
def smtp_server() -> Iterator[tuple[Sink, int]]:
    sink = Sink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    yield sink, port
    controller.stop()


# --- Bitrix24 server -----------------------------------------------------------------------
class FakePortal:
    """Speaks Bitrix24's REST format on /rest/<user>/<secret>/<method>.json."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.stamps: list[float] = []
        self.overloaded = 0  # next N calls answer 503 QUERY_LIMIT_EXCEEDED
        self.script: list[tuple[int, dict[str, Any]]] = []  # next answers, in order
        self.pings = 0
        self.next_id = 100

    async def method(self, request: Request) -> JSONResponse:
        if request.path_params["secret"] != "s3cr3t":
            return JSONResponse({"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"},
                                401)
        name = request.path_params["method"]
        payload = await request.json() if await request.body() else {}
        if name == "server.time":
            self.pings += 1
            self.stamps.append(time.monotonic())
            return JSONResponse({"result": "2025-12-14T12:00:00+03:00", "time": {}})
        if name != "im.notify.personal.add":
            return JSONResponse({"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"},
                                404)
        self.calls.append(payload)
        self.stamps.append(time.monotonic())
        if self.script:
            status, body = self.script.pop(0)
            return JSONResponse(body, status)
        if self.overloaded > 0:
            self.overloaded -= 1
            return JSONResponse({"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"},
                                503)
        if not payload.get("USER_ID"):
            return JSONResponse({"error": "USER_ID_EMPTY", "error_description": "User ID can't be empty"},
                                400)
        if int(payload["USER_ID"]) == 404:
            return JSONResponse({"error": "USER_NOT_FOUND", "error_description": "User not found"}, 400)
        self.next_id += 1
        return JSONResponse({"result": self.next_id, "time": {"start": time.time()}})


@asynccontextmanager
async def running_portal() -> AsyncIterator[tuple[FakePortal, str]]:
    """A local server speaking Bitrix24's incoming-webhook format; yields it and its URL."""
    fake = FakePortal()
    app = Starlette(routes=[Route("/rest/{user}/{secret}/{method}.json", fake.method, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn exposes a flag, not an event)
        await asyncio.sleep(0.01)
    yield fake, f"http://127.0.0.1:{port}/rest/1/s3cr3t/"
    server.should_exit = True
    await task


@pytest.fixture
async def portal() -> AsyncIterator[tuple[FakePortal, str]]:
    async with running_portal() as served:
        yield served


def draft(contacts: list[dict[str, Any]], immediate: bool = False, strategy: str = "send_to_first_available",
          subject: str = "user-1", message: str = "Привет!") -> NotificationDraft:
    return NotificationDraft(id=str(uuid.uuid4()), subject_id=subject, subject_name=None,
                             contacts=contacts, message=message, is_immediate=immediate,
                             strategy=strategy, created_at=time.time())


# --- store ------------------------------------------------------------------------------------
async def test_accept_stores_notifications_with_outbox_entries(db_pool: asyncpg.Pool) -> None:
    store = NotificationsStore(db_pool)
    a = draft([{"type": "email", "value": "a@b.co"}], immediate=True)
    b = draft([{"type": "bitrix", "value": 1}])
    await store.accept([a, b])
    assert await db_pool.fetchval("SELECT count(*) FROM notification_outbox") == 2
    with pytest.raises(asyncpg.UniqueViolationError):
        await store.accept([draft([{"type": "bitrix", "value": 2}]), a])
    # the failed call stored nothing
    assert await db_pool.fetchval("SELECT count(*) FROM notifications") == 2


async def test_claims_split_immediate_queued_and_never_overlap(db_pool: asyncpg.Pool) -> None:
    store = NotificationsStore(db_pool)
    now = [draft([{"type": "email", "value": "a@b.co"}], immediate=True) for _ in range(3)]
    later = [draft([{"type": "email", "value": "a@b.co"}]) for _ in range(40)]
    await store.accept(now + later)
    urgent = await store.claim_urgent(10, 60)
    assert {j.id for j in urgent} == {d.id for d in now}
    one, two = await asyncio.gather(store.claim_queued(25, 60), store.claim_queued(25, 60))
    assert len(one) + len(two) == 40
    assert not {j.id for j in one} & {j.id for j in two}
    assert await store.claim_queued(25, 60) == []  # all leased


async def test_an_expired_lease_is_claimed_again(db_pool: asyncpg.Pool) -> None:
    """A dispatcher that died mid-round leaves its lease to expire: nothing is lost."""
    store = NotificationsStore(db_pool)
    d = draft([{"type": "email", "value": "a@b.co"}], immediate=True)
    await store.accept([d])
    assert [j.id for j in await store.claim_ids([d.id], lease_s=-1)] == [d.id]  # lease already over
    assert [j.id for j in await store.claim_urgent(10, 60)] == [d.id]
    assert await store.claim_urgent(10, 60) == []


async def test_idempotency_keys(db_pool: asyncpg.Pool) -> None:
    store = NotificationsStore(db_pool)
    assert (await store.idempotency_begin("u", "k", "h1", 3600, 60)).outcome == "new"
    assert (await store.idempotency_begin("u", "k", "h1", 3600, 60)).outcome == "in_flight"
    assert (await store.idempotency_begin("u", "k", "h2", 3600, 60)).outcome == "conflict"
    await store.idempotency_finish("u", "k", 202, b'{"ok":1}')
    replay = await store.idempotency_begin("u", "k", "h1", 3600, 60)
    assert (replay.outcome, replay.status, replay.body) == ("replay", 202, b'{"ok":1}')
    assert (await store.idempotency_begin("other", "k", "h2", 3600, 60)).outcome == "new"
    # an expired key is fresh again
    assert (await store.idempotency_begin("u", "old", "h", -1, 60)).outcome == "new"
    assert (await store.idempotency_begin("u", "old", "h9", 3600, 60)).outcome == "new"
    # a key abandoned in flight (its process died) is taken over by the same request
    assert (await store.idempotency_begin("u", "dead", "h", 3600, -1)).outcome == "new"
    assert (await store.idempotency_begin("u", "dead", "h", 3600, 60)).outcome == "new"


async def test_the_dispatcher_purges_expired_idempotency_keys(db_pool: asyncpg.Pool) -> None:
    store = NotificationsStore(db_pool)
    await store.idempotency_begin("u", "expired", "h", -1, 60)  # already past its TTL
    await store.idempotency_begin("u", "live", "h", 3600, 60)
    eng = engine(store, {}, purge_interval_s=3600)
    eng.start()  # the flush loop purges on its first pass, then every purge_interval_s
    try:
        for _ in range(200):
            if eng.purged:
                break
            await asyncio.sleep(0.05)
    finally:
        await eng.stop()
    assert eng.purged == 1
    keys = [r["key"] for r in await db_pool.fetch("SELECT key FROM notification_idempotency")]
    assert keys == ["live"]


# --- SMTP ---------------------------------------------------------------------------------
async def test_smtp_channel_delivers_over_a_reused_pool(smtp_server: tuple[Sink, int]) -> None:
    sink, port = smtp_server
    ch = SmtpChannel("127.0.0.1", port, mail_from="noreply@conveyor.test", subject="Уведомление",
                     pool_size=2)
    batch = [Delivery(f"n{i}", 0, f"user{i}@example.com", f"Привет, {i}!") for i in range(10)]
    results = await ch.send(batch)
    assert [r.status for r in results] == [SendStatus.DELIVERED] * 10
    assert ch.connects == 2
    await ch.send(batch[:2])  # next batch reuses the open connections
    assert ch.connects == 2
    await ch.close()
    assert len(sink.messages) == 12
    # two connections send at once: find user0's mail whatever the arrival order
    [(mail_from, rcpts, content)] = [m for m in sink.messages[:10] if m[1] == ["user0@example.com"]]
    msg = message_from_bytes(content)
    assert mail_from == "noreply@conveyor.test" and rcpts == ["user0@example.com"]
    assert msg["X-Notification-Id"] == "n0"
    assert str(msg["Subject"]) and msg.get_content_type() == "text/plain"
    assert msg.get_payload(decode=True).decode(msg.get_content_charset()).strip() == "Привет, 0!"


async def test_smtp_replies_are_classified(smtp_server: tuple[Sink, int]) -> None:
    sink, port = smtp_server
    ch = SmtpChannel("127.0.0.1", port, mail_from="noreply@conveyor.test", subject="s", pool_size=1)
    results = await ch.send([Delivery("a", 0, "nobody@example.com", "x"),
                             Delivery("b", 0, "busy@example.com", "x"),
                             Delivery("c", 0, "fine@example.com", "x")])
    assert [r.status for r in results] == [SendStatus.PERMANENT, SendStatus.TRANSIENT, SendStatus.DELIVERED]
    assert results[0].detail is not None and results[0].detail.startswith("550")
    assert [m[1] for m in sink.messages] == [["fine@example.com"]]
    await ch.close()


async def test_smtp_down_is_transient_and_ping_fails() -> None:
    ch = SmtpChannel("127.0.0.1", free_port(), mail_from="a@b.co", subject="s", timeout_s=2)
    [r] = await ch.send([Delivery("a", 0, "x@example.com", "x")])
    assert r.status is SendStatus.TRANSIENT
    with pytest.raises(OSError):
        await ch.ping()


async def test_smtp_down_costs_one_connect_per_share_not_per_message() -> None:
    ch = SmtpChannel("127.0.0.1", free_port(), mail_from="a@b.co", subject="s", timeout_s=2,
                     pool_size=2)
    results = await ch.send([Delivery(f"n{i}", 0, f"u{i}@example.com", "x") for i in range(10)])
    assert [r.status for r in results] == [SendStatus.TRANSIENT] * 10
    assert all((r.detail or "").startswith("connect:") for r in results)
    assert ch.connect_attempts == 2 and ch.connects == 0


async def test_eml_files_are_written_once_per_contact(tmp_path: Path) -> None:
    ch = MailDirChannel(tmp_path / "mail", "noreply@conveyor.test", "Уведомление")
    d = Delivery("n1", 0, "user@example.com", "Привет!")
    await ch.send([d])
    await ch.send([d])  # a resend replaces the file
    files = list((tmp_path / "mail").glob("*.eml"))
    assert [f.name for f in files] == ["n1-0.eml"]
    msg = message_from_bytes(files[0].read_bytes())
    assert msg["To"] == "user@example.com"


# --- Bitrix24 -------------------------------------------------------------------------------
async def test_bitrix_channel_speaks_the_webhook_format(portal: tuple[FakePortal, str]) -> None:
    fake, url = portal
    ch = BitrixChannel(url, bucket=TokenBucket(100.0, 10))
    results = await ch.send([Delivery("n1", 0, 12345, "Привет"), Delivery("n2", 0, 404, "x")])
    assert fake.calls[0] == {"USER_ID": 12345, "MESSAGE": "Привет"}
    assert results[0].status is SendStatus.DELIVERED and results[0].detail == "101"
    assert results[1].status is SendStatus.PERMANENT and "USER_NOT_FOUND" in (results[1].detail or "")
    fake.overloaded = 1
    [r] = await ch.send([Delivery("n3", 0, 7, "x")])
    assert r.status is SendStatus.TRANSIENT and "QUERY_LIMIT_EXCEEDED" in (r.detail or "")
    await ch.ping()
    bad = BitrixChannel(url.replace("s3cr3t", "wrong"), bucket=TokenBucket(100.0, 10))
    [r] = await bad.send([Delivery("n4", 0, 7, "x")])
    assert r.status is SendStatus.PERMANENT
    with pytest.raises(RuntimeError):
        await bad.ping()
    await ch.close()
    await bad.close()


async def test_bitrix_requests_are_paced_to_the_portal_limit(portal: tuple[FakePortal, str]) -> None:
    fake, url = portal
    ch = BitrixChannel(url, bucket=TokenBucket(rate=2.0, burst=2))
    await ch.send([Delivery(f"n{i}", 0, i + 1, "x") for i in range(5)])
    gaps = [b - a for a, b in zip(fake.stamps, fake.stamps[1:], strict=False)]
    # two at once (burst), then one every half second
    assert all(g >= 0.45 for g in gaps[1:]), gaps
    await ch.close()


async def test_bitrix_channels_on_one_portal_share_its_rate(portal: tuple[FakePortal, str]) -> None:
    """Two channels built on the same webhook (no bucket injected) pace together: the
    portal sees its limit, not twice it."""
    fake, url = portal
    one = BitrixChannel(url, rate_per_s=2.0, burst=1)
    two = BitrixChannel(url.replace("/rest/1/", "/rest/2/"), rate_per_s=2.0, burst=1)
    assert one.gate is two.gate and one.key == two.key
    await asyncio.gather(one.send([Delivery(f"a{i}", 0, i + 1, "x") for i in range(3)]),
                         two.send([Delivery(f"b{i}", 0, i + 10, "x") for i in range(3)]))
    assert len(fake.calls) == 6
    gaps = [b - a for a, b in zip(fake.stamps, fake.stamps[1:], strict=False)]
    # one request per half second for both together (separate buckets would send two at
    # once: gaps near 0); the margin absorbs scheduling jitter on a busy machine
    assert all(g >= 0.25 for g in gaps), gaps
    await one.close()
    await two.close()


class CountingGate:
    """A ``RateGate`` that lets everything through and counts who asked."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    async def acquire(self, key: str) -> None:
        self.keys.append(key)


async def test_bitrix_channel_asks_its_injected_gate_before_every_request(
        portal: tuple[FakePortal, str]) -> None:
    fake, url = portal
    gate = CountingGate()
    ch = BitrixChannel(url, gate=gate, ping_cache_s=0.0)
    fake.overloaded = 1  # a refused request went through the gate too
    await ch.send([Delivery(f"n{i}", 0, i + 1, "x") for i in range(4)])
    await ch.ping()
    await ch.ping()
    assert len(fake.calls) == 4 and fake.pings == 2
    port = url.split("/")[2]
    assert gate.keys == [f"bitrix:{port}"] * 6  # one acquire per request, keyed by portal
    await ch.close()


async def test_bitrix_readiness_ping_is_paced_and_cached(portal: tuple[FakePortal, str]) -> None:
    fake, url = portal
    bucket = TokenBucket(rate=2.0, burst=1)
    ch = BitrixChannel(url, bucket=bucket, ping_cache_s=60)
    await asyncio.gather(*(ch.ping() for _ in range(10)))
    for _ in range(10):
        await ch.ping()
    assert fake.pings == 1  # one request, however often readiness is probed
    assert bucket.tokens < 1.0  # and it took its token like any other request
    await ch.send([Delivery("n1", 0, 5, "x")])
    assert fake.stamps[1] - fake.stamps[0] >= 0.25  # the send waited for the ping's token (0.5 s)
    bad = BitrixChannel(url.replace("s3cr3t", "wrong"), bucket=TokenBucket(100.0, 10), ping_cache_s=60)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="NO_AUTH_FOUND"):
            await bad.ping()
    assert fake.pings == 1  # the failure is cached too (the wrong secret never reaches server.time)
    await ch.close()
    await bad.close()


async def test_bitrix_unreachable_is_transient() -> None:
    ch = BitrixChannel(f"http://127.0.0.1:{free_port()}/rest/1/x/", bucket=TokenBucket(100.0, 10))
    [r] = await ch.send([Delivery("n", 0, 1, "x")])
    assert r.status is SendStatus.TRANSIENT
    await ch.close()


# --- the engine over store and channels ---------------------------------------------------
def engine(store: NotificationsStore, channels: dict[str, Any], **kw: Any) -> DispatchEngine:
    guarded = {k: GuardedChannel(c, CircuitBreaker(5, 30)) for k, c in channels.items()}
    policy = kw.pop("policy", RetryPolicy(3, 0.0, 0.0))
    return DispatchEngine(store, guarded, policy, batch_size=kw.pop("batch_size", 100),
                          flush_interval_s=kw.pop("flush_interval_s", 60), **kw)


async def test_queued_notifications_are_flushed_in_batches_and_recorded(
        db_pool: asyncpg.Pool, smtp_server: tuple[Sink, int]) -> None:
    sink, port = smtp_server
    store = NotificationsStore(db_pool)
    smtp = SmtpChannel("127.0.0.1", port, mail_from="noreply@conveyor.test", subject="s", pool_size=2)
    drafts = [draft([{"type": "email", "value": f"u{i}@example.com"}]) for i in range(25)]
    await store.accept(drafts)
    eng = engine(store, {"email": smtp}, batch_size=10)
    assert await eng.urgent_once() == 0  # queued ones wait for the flush
    assert await eng.flush_once() == 25
    assert eng.rounds == 3
    assert sorted(m[1][0] for m in sink.messages) == sorted(f"u{i}@example.com" for i in range(25))
    got = await store.get(drafts[0].id)
    assert got is not None and got["state"] == "delivered" and got["finishedAt"]
    assert got["channels"][0]["attempts"][0]["status"] == "delivered"
    assert await db_pool.fetchval("SELECT count(*) FROM notification_outbox") == 0
    await smtp.close()


async def test_immediate_first_available_falls_back_to_bitrix_and_retries(
        db_pool: asyncpg.Pool, smtp_server: tuple[Sink, int], portal: tuple[FakePortal, str]) -> None:
    _, port = smtp_server
    fake, url = portal
    store = NotificationsStore(db_pool)
    smtp = SmtpChannel("127.0.0.1", port, mail_from="noreply@conveyor.test", subject="s")
    bitrix = BitrixChannel(url, bucket=TokenBucket(100.0, 10))
    fallback = draft([{"type": "email", "value": "nobody@example.com"}, {"type": "bitrix", "value": 42}],
                     immediate=True)
    both = draft([{"type": "email", "value": "busy@example.com"}, {"type": "bitrix", "value": 43}],
                 immediate=True, strategy="send_to_all_available")
    await store.accept([fallback, both])
    eng = engine(store, {"email": smtp, "bitrix": bitrix}, policy=RetryPolicy(3, 3600.0, 3600.0))
    eng.kick([fallback.id, both.id])
    assert await eng.urgent_once() == 2
    a = await store.get(fallback.id)
    assert a is not None and a["state"] == "delivered"
    assert [c["status"] for c in a["channels"]] == ["failed", "delivered"]
    b = await store.get(both.id)
    assert b is not None and b["state"] == "processing"  # the busy mailbox is retried
    assert [c["status"] for c in b["channels"]] == ["pending", "delivered"]
    assert (await db_pool.fetchval("SELECT due_at - now() FROM notification_outbox")).total_seconds() > 1000
    for _ in range(2):  # the backoff has passed: the retry is due
        await db_pool.execute("UPDATE notification_outbox SET due_at = now()")
        assert await eng.urgent_once() == 1
    b = await store.get(both.id)
    assert b is not None and b["state"] == "partially_delivered"
    assert [at["status"] for at in b["channels"][0]["attempts"]] == ["transient"] * 3
    assert sorted(call["USER_ID"] for call in fake.calls) == [42, 43]  # never sent twice
    await smtp.close()
    await bitrix.close()


async def test_a_round_lost_with_its_process_is_resumed(db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    store = NotificationsStore(db_pool)
    d = draft([{"type": "email", "value": "a@example.com"}], immediate=True)
    await store.accept([d])
    await store.claim_ids([d.id], lease_s=-1)  # claimed by a dispatcher that then died
    mail = MailDirChannel(tmp_path / "mail", "noreply@conveyor.test", "s")
    assert await engine(store, {"email": mail}).urgent_once() == 1
    assert (await store.get(d.id) or {})["state"] == "delivered"
    assert [f.name for f in (tmp_path / "mail").glob("*.eml")] == [f"{d.id}-0.eml"]


async def test_background_loops_deliver_kicked_notifications(db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    """Polling is off (ticks of an hour): only the kick can get the notification sent."""
    store = NotificationsStore(db_pool)
    d = draft([{"type": "email", "value": "a@example.com"}], immediate=True)
    await store.accept([d])
    eng = engine(store, {"email": MailDirChannel(tmp_path / "mail", "noreply@conveyor.test", "s")},
                 tick_s=3600, flush_interval_s=3600)
    eng.start()
    await asyncio.sleep(0.3)  # the loops are waiting: nothing is sent without the kick
    assert (await store.get(d.id) or {})["state"] == "accepted"
    eng.kick([d.id])
    try:
        for _ in range(200):
            if (await store.get(d.id) or {}).get("state") == "delivered":
                break
            await asyncio.sleep(0.05)
    finally:
        await eng.stop()
    assert (await store.get(d.id) or {})["state"] == "delivered"
    attempts = await db_pool.fetch("SELECT notification_id, status FROM notification_attempts")
    assert [(str(a["notification_id"]), a["status"]) for a in attempts] == [(d.id, "delivered")]
    progress = json.loads(await db_pool.fetchval("SELECT progress FROM notifications WHERE id = $1",
                                                 uuid.UUID(d.id)))
    assert progress[0]["status"] == "delivered"


@pytest.mark.parametrize("answer, final, attempts", [
    ((429, {"error": "TOO_MANY_REQUESTS", "error_description": "Too many requests"}),
     "delivered", ["transient", "delivered"]),
    ((503, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}),
     "delivered", ["transient", "delivered"]),
    ((400, {"error": "USER_ID_EMPTY", "error_description": "User ID can't be empty"}),
     "failed", ["permanent"]),
])
async def test_bitrix_answers_are_retried_or_fail_the_channel(
        db_pool: asyncpg.Pool, portal: tuple[FakePortal, str], answer: tuple[int, dict[str, Any]],
        final: str, attempts: list[str]) -> None:
    fake, url = portal
    store = NotificationsStore(db_pool)
    bitrix = BitrixChannel(url, bucket=TokenBucket(100.0, 10))
    d = draft([{"type": "bitrix", "value": 77}], immediate=True)
    await store.accept([d])
    fake.script = [answer]
    eng = engine(store, {"bitrix": bitrix})
    assert await eng.urgent_once() == 1
    got = await store.get(d.id)
    assert got is not None
    if final == "delivered":  # transient: still pending, retried when due
        assert got["state"] == "processing" and got["channels"][0]["status"] == "pending"
        await db_pool.execute("UPDATE notification_outbox SET due_at = now()")
        assert await eng.urgent_once() == 1
        got = await store.get(d.id)
        assert got is not None
    assert got["state"] == final
    assert [a["status"] for a in got["channels"][0]["attempts"]] == attempts
    assert got["channels"][0]["status"] == ("delivered" if final == "delivered" else "failed")
    assert len(fake.calls) == len(attempts)
    await bitrix.close()


async def test_failing_rounds_slow_the_flush_down(db_pool: asyncpg.Pool) -> None:
    """The feedback loop: a round whose sends fail halves the batch and doubles the
    interval, so the rest of the backlog waits for a later, smaller round."""
    store = NotificationsStore(db_pool)
    await store.accept([draft([{"type": "email", "value": f"u{i}@example.com"}]) for i in range(30)])
    down = SmtpChannel("127.0.0.1", free_port(), mail_from="a@b.co", subject="s", timeout_s=2)
    eng = engine(store, {"email": down}, batch_size=10)
    assert (eng.flush_pace.batch, eng.flush_pace.state) == (10, "normal")
    assert await eng.flush_once() == 10  # one round, then it stops
    assert (eng.flush_pace.batch, eng.flush_pace.interval_s) == (5, 120.0)
    assert eng.flush_pace.state == "throttled"
    assert await db_pool.fetchval("SELECT count(*) FROM notification_outbox WHERE round = 0") == 20


async def test_every_attempt_is_logged_with_the_notification_id_as_trace_id(
        db_pool: asyncpg.Pool, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = NotificationsStore(db_pool)
    d = draft([{"type": "email", "value": "a@example.com"}], immediate=True)
    await store.accept([d])
    eng = engine(store, {"email": MailDirChannel(tmp_path / "mail", "noreply@conveyor.test", "s")})
    with caplog.at_level(logging.INFO, logger="conveyor.notifications"):
        eng.kick([d.id])
        assert await eng.urgent_once() == 1
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "conveyor.notifications" and r.getMessage().startswith("{")]
    [attempt] = [x for x in lines if x["event"] == "notification_attempt"]
    assert attempt["traceId"] == d.id and attempt["channel"] == "email"
    assert attempt["status"] == "delivered" and attempt["attempt"] == 1
    assert [x["state"] for x in lines if x["event"] == "notification_round"] == ["delivered"]


# --- each delivery recorded as it completes -----------------------------------------------
def delivered(nid: str, contact: int, attempt: int = 1) -> Attempt:
    return Attempt(nid, contact, "email", attempt, SendStatus.DELIVERED, "250 accepted", 0.02)


async def attempt_rows(pool: asyncpg.Pool, nid: str) -> list[tuple[int, int, str]]:
    rows = await pool.fetch("SELECT contact_index, attempt, status FROM notification_attempts"
                            " WHERE notification_id = $1 ORDER BY id", uuid.UUID(nid))
    return [(r["contact_index"], r["attempt"], r["status"]) for r in rows]


async def test_a_recorded_delivery_is_seen_by_the_next_claim_and_never_sent_again(
        db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    store = NotificationsStore(db_pool)
    d = draft([{"type": "email", "value": "a@example.com"}, {"type": "email", "value": "b@example.com"}],
              immediate=True, strategy="send_to_all_available")
    await store.accept([d])
    await store.claim_ids([d.id], lease_s=-1)  # claimed by a dispatcher that dies mid-round
    await store.record_delivered(delivered(d.id, 0))
    row = "SELECT progress::text, updated_at FROM notifications WHERE id = $1"
    before = await db_pool.fetchrow(row, uuid.UUID(d.id))
    await store.record_delivered(delivered(d.id, 0))  # a repeat changes nothing
    assert await db_pool.fetchrow(row, uuid.UUID(d.id)) == before
    assert await attempt_rows(db_pool, d.id) == [(0, 1, "delivered")]
    # The next claim (the lease ran out) sees the delivery and sends to the other contact only.
    [job] = await store.claim_urgent(10, 60)
    assert job.progress[0] == ContactProgress(ContactStatus.DELIVERED, 1)
    assert job.progress[1].status is ContactStatus.PENDING
    mail = MailDirChannel(tmp_path / "mail", "noreply@conveyor.test", "s")
    results = await dispatch_round([job], {"email": mail}, RetryPolicy(3, 0.0, 0.0), journal=store)
    await store.finish_round(results)
    assert [f.name for f in (tmp_path / "mail").glob("*.eml")] == [f"{d.id}-1.eml"]
    got = await store.get(d.id)
    assert got is not None and got["state"] == "delivered"
    assert [c["status"] for c in got["channels"]] == ["delivered", "delivered"]
    # Recorded as it happened, then again by finish_round: each delivery is stored once.
    assert await attempt_rows(db_pool, d.id) == [(0, 1, "delivered"), (1, 1, "delivered")]


async def test_finish_round_never_turns_a_recorded_delivery_back(db_pool: asyncpg.Pool) -> None:
    """A round that ends with older progress (its lease ran out while it worked and another
    dispatcher delivered meanwhile) keeps the recorded delivery and settles with it."""
    store = NotificationsStore(db_pool)
    d = draft([{"type": "email", "value": "a@example.com"}, {"type": "email", "value": "b@example.com"}],
              strategy="send_to_all_available")
    await store.accept([d])
    [job] = await store.claim_ids([d.id], lease_s=-1)
    await store.record_delivered(delivered(d.id, 0))
    job.progress[1] = ContactProgress(ContactStatus.FAILED, 1, "550 no")
    stale = RoundResult(job, [Attempt(d.id, 1, "email", 1, SendStatus.PERMANENT, "550 no", 0.01)],
                        FinalState.FAILED)
    await store.finish_round([stale])
    got = await store.get(d.id)
    assert got is not None and got["state"] == "partially_delivered"
    assert [c["status"] for c in got["channels"]] == ["delivered", "failed"]
    assert await attempt_rows(db_pool, d.id) == [(0, 1, "delivered"), (1, 1, "permanent")]
    assert await db_pool.fetchval("SELECT count(*) FROM notification_outbox") == 0


async def test_smtp_has_at_most_pool_size_messages_sent_and_not_yet_reported(
        smtp_server: tuple[Sink, int]) -> None:
    """Two batches at once (the dispatcher's two loops) share the channel's slots: while a
    result is being recorded, no more than ``pool_size`` messages are accepted unrecorded."""
    sink, port = smtp_server
    sink.delay_s = 0.02
    ch = SmtpChannel("127.0.0.1", port, mail_from="noreply@conveyor.test", subject="s", pool_size=2)
    reported = 0
    worst = 0

    async def on_result(i: int, r: SendResult) -> None:
        nonlocal reported, worst
        for _ in range(2):  # a record taking its time
            worst = max(worst, len(sink.messages) - reported)
            await asyncio.sleep(0.02)
        reported += 1

    batches = [[Delivery(f"{b}{i}", 0, f"{b}{i}@example.com", "x") for i in range(8)] for b in "ab"]
    results = await asyncio.gather(*(ch.send(batch, on_result) for batch in batches))
    await ch.close()
    assert all(r.status is SendStatus.DELIVERED for rs in results for r in rs)
    assert reported == len(sink.messages) == 16
    assert 1 <= worst <= 2, worst


async def test_a_dispatcher_killed_mid_round_repeats_at_most_its_sends_in_flight(
        db_pool: asyncpg.Pool, smtp_server: tuple[Sink, int]) -> None:
    sink, port = smtp_server
    sink.delay_s = 0.03
    store = NotificationsStore(db_pool)
    drafts = [draft([{"type": "email", "value": f"k{i}@example.com"}]) for i in range(30)]
    await store.accept(drafts)
    doomed = SmtpChannel("127.0.0.1", port, mail_from="noreply@conveyor.test", subject="s", pool_size=2)
    round_ = asyncio.create_task(engine(store, {"email": doomed}, lease_s=0.5).flush_once())
    while len(sink.messages) < 10:
        assert not round_.done()
        await asyncio.sleep(0.005)
    round_.cancel()  # killed: nothing after this point runs, finish_round included
    with pytest.raises(asyncio.CancelledError):
        await round_
    await asyncio.sleep(0.6)  # the lease runs out (and a message the server was taking lands)
    at_kill = len(sink.messages)
    assert at_kill < 30
    smtp = SmtpChannel("127.0.0.1", port, mail_from="noreply@conveyor.test", subject="s", pool_size=2)
    assert await engine(store, {"email": smtp}).flush_once() >= 30 - at_kill
    await smtp.close()
    copies: dict[str, list[str]] = {}
    for _, rcpts, content in sink.messages:
        copies.setdefault(rcpts[0], []).append(str(message_from_bytes(content)["Message-ID"]))
    assert sorted(copies) == sorted(f"k{i}@example.com" for i in range(30))  # none lost
    repeats = sum(len(ids) - 1 for ids in copies.values())
    assert repeats <= 2, f"{repeats} repeated of {at_kill} sent before the kill"
    assert all(len(set(ids)) == 1 for ids in copies.values())  # a repeat is the same message
    states = await db_pool.fetch("SELECT DISTINCT state FROM notifications")
    assert [r["state"] for r in states] == ["delivered"]
