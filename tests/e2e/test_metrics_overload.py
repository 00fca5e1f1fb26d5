"""Metrics move, and the system holds when driven well past its capacity."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import WsClient, create_chat
from tests.client import chat_of_two, user
from tests.conftest import App

pytestmark = pytest.mark.e2e


async def scrape(app: App) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient(base_url=app.base_url) as http:
        r = await http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):  # also validates the format
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[Any, float], name: str, **match: str) -> float:
    return sum(v for (n, lb), v in samples.items()
               if n == name and all(dict(lb).get(k) == val for k, val in match.items()))


async def test_metrics_counters_move_with_traffic(conveyor: App) -> None:
    before = await scrape(conveyor)
    chat, _, bob, a, b = await chat_of_two(conveyor)
    for i in range(3):
        await a.ack(await a.chat(chat, f"m{i}"))
    msg = await b.message(seq=3)
    await b.receipt([msg["messageId"]])
    await a.send({"type": "signal", "id": "s1", "to": bob, "payload": {"typing": True}})
    await a.ack("s1")
    await asyncio.sleep(1.5)  # > metrics_push_s
    after = await scrape(conveyor)

    def moved(name: str, **match: str) -> float:
        return total(after, name, **match) - total(before, name, **match)

    assert moved("conveyor_messages_in_total", type="chat") >= 3
    assert moved("conveyor_messages_in_total", type="signal") >= 1
    assert moved("conveyor_acks_total", type="chat", status="accepted") >= 3
    assert moved("conveyor_messages_out_total", type="message") >= 3
    assert moved("conveyor_stage_seconds_count", stage="persist_chat") >= 1
    assert moved("conveyor_stage_seconds_count", stage="debit_credits") >= 1
    assert moved("conveyor_batch_size_count", type="chat") >= 1
    assert moved("conveyor_message_events_total", kind="accepted", type="chat") >= 3
    assert moved("conveyor_message_events_total", kind="delivered") >= 1
    assert moved("conveyor_message_latency_seconds_count", kind="delivered") >= 1
    assert total(after, "conveyor_connections") >= 2
    assert total(after, "conveyor_users_online") >= 2
    assert ("conveyor_outbox_lag_seconds", ()) in after
    await a.close()
    await b.close()


async def test_an_offline_members_backlog_shows_as_pending_until_receipted(conveyor: App) -> None:
    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    before = total(await scrape(conveyor), "conveyor_deliveries_pending")
    for i in range(3):  # Bob is offline: nothing reaches a socket, all of it is backlog
        await a.ack(await a.chat(chat, f"while away {i}"))
    during = await scrape(conveyor)
    assert total(during, "conveyor_deliveries_pending") >= before + 3
    # Bob's messages were stored before this scrape: the oldest unreceipted one has an age.
    assert total(during, "conveyor_delivery_lag_seconds") > 0
    b = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    last = await b.message(seq=3)
    await b.receipt([last["messageId"]])
    pending = before + 3.0
    for _ in range(50):  # the receipt is applied in the next receipt batch
        pending = total(await scrape(conveyor), "conveyor_deliveries_pending")
        if pending <= before:
            break
        await asyncio.sleep(0.2)
    assert pending <= before
    await a.close()
    await b.close()


async def ack_latency(a: WsClient, chat: str, n: int = 15) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await a.ack(await a.chat(chat, "probe"))
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


async def test_overload_loses_no_durable_message_and_recovers(conveyor: App, app_db: Any) -> None:
    """Drive chat and signals far past a small inbound buffer (64 per type and replica):
    24 senders pipelining 90 messages each at once (about 2,000 messages, several times
    what the two-core test cluster drains per second), with signals on top."""
    pairs = 24
    per_sender = 90  # under the credit capacity: only overload is in play
    signalers = 12
    per_signaler = 95
    probe_user, probe_peer = user(), user()
    probe_chat = await create_chat(conveyor.base_url, conveyor.token(probe_user), [probe_peer])
    probe = await WsClient.connect(conveyor.ws_url, conveyor.token(probe_user))
    idle_before = await ack_latency(probe, probe_chat)
    metrics_before = await scrape(conveyor)

    async def make_pair() -> tuple[str, WsClient, WsClient]:
        chat, _, _, s, r = await chat_of_two(conveyor)
        return chat, s, r

    made = await asyncio.gather(*(make_pair() for _ in range(pairs)))
    chats = [m[0] for m in made]
    senders = [m[1] for m in made]
    receivers = [m[2] for m in made]
    # Each signaler shares a chat with the receiver it signals (signals go to contacts).
    sig_users = [user() for _ in range(signalers)]
    await asyncio.gather(*(create_chat(conveyor.base_url, conveyor.token(u),
                                       [receivers[i % pairs].user_id])
                           for i, u in enumerate(sig_users)))
    sig = await asyncio.gather(*(WsClient.connect(conveyor.ws_url, conveyor.token(u))
                                 for u in sig_users))

    async def blast_chat(c: WsClient, chat: str) -> list[dict[str, Any]]:
        ids = [f"o{i}" for i in range(per_sender)]
        for cid in ids:
            await c.chat(chat, f"load {cid}", client_id=cid)
        return [await c.ack(cid, timeout=120) for cid in ids]

    async def blast_signals(c: WsClient, to: str) -> None:
        for i in range(per_signaler):
            await c.send({"type": "signal", "id": f"sg{i}", "to": to, "payload": {"n": i}})

    async def receive_all(r: WsClient, chat: str, want: int) -> list[dict[str, Any]]:
        got: dict[str, dict[str, Any]] = {}
        while len(got) < want:
            m = await r.message(chatId=chat, timeout=120)
            got[m["messageId"]] = m
            await r.receipt([m["messageId"]])
        return list(got.values())

    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(blast_chat(s, c) for s, c in zip(senders, chats, strict=True)),
        *(blast_signals(c, receivers[i % pairs].user_id) for i, c in enumerate(sig)),
    )
    acks = [a for part in results[:pairs] for a in part]
    accepted = [a for a in acks if a["status"] in ("accepted", "duplicate")]
    delivered = await asyncio.gather(*(
        receive_all(r, c, per_sender) for r, c in zip(receivers, chats, strict=True)))
    busy_s = time.perf_counter() - t0

    # Every chat message was accepted (durable: never dropped), stored once, delivered.
    assert len(accepted) == pairs * per_sender, [a for a in acks if a not in accepted][:3]
    for chat, got in zip(chats, delivered, strict=True):
        stored = await app_db.fetchval("SELECT count(*) FROM messages WHERE chat_id=$1", chat)
        assert stored == per_sender
        assert [m["seq"] for m in got] == list(range(1, per_sender + 1))  # in order, no gaps
    # The clients paused by a full buffer were told, once per episode (not per frame).
    notices = [f for c in (*senders, *receivers) for f in c.inbox
               if f["type"] == "system" and f["event"] == "overload"]
    await asyncio.sleep(1.5)
    metrics_after = await scrape(conveyor)

    def moved(name: str, **match: str) -> float:
        return total(metrics_after, name, **match) - total(metrics_before, name, **match)

    dropped: dict[str, float] = {}  # frame type -> drops during the burst, any stage
    for key in {*metrics_before, *metrics_after}:
        if key[0] == "conveyor_dropped_total":
            n = metrics_after.get(key, 0.0) - metrics_before.get(key, 0.0)
            if n:
                kind = dict(key[1])["type"]
                dropped[kind] = dropped.get(kind, 0.0) + n
    dropped_chat = dropped.get("chat", 0.0)
    dropped_signal = dropped.get("signal", 0.0)
    overloads = moved("conveyor_overload_total")

    # Latency back near idle once the burst is over: measured against the idle baseline of
    # this same run, with a generous bound, allowing the cluster a bounded time to settle.
    bound = max(4 * idle_before, idle_before + 0.1)
    idle_after = await ack_latency(probe, probe_chat)
    for _ in range(10):
        if idle_after <= bound:
            break
        await asyncio.sleep(1.0)
        idle_after = await ack_latency(probe, probe_chat)

    figures = {
        "chat_messages": pairs * per_sender, "signals_sent": signalers * per_signaler,
        "busy_seconds": round(busy_s, 2),
        "chat_delivered_per_s": round(pairs * per_sender / busy_s, 1),
        "overload_pauses": overloads, "overload_notices": len(notices),
        "signals_dropped": dropped_signal, "chat_dropped": dropped_chat,
        "stage_retries": moved("conveyor_stage_retries_total"),
        "idle_ack_p50_ms_before": round(idle_before * 1000, 1),
        "idle_ack_p50_ms_after": round(idle_after * 1000, 1),
    }
    print("\nOVERLOAD FIGURES", json.dumps(figures))
    # The buffers overflowed for real, the gateways paused reading, and clients were told.
    assert overloads > 0, "the load never filled a durable buffer"
    assert notices, "no client received a system overload frame"
    assert all(n["data"]["type"] in ("chat", "receipt") for n in notices), notices[:3]
    assert len(notices) <= overloads  # at most one notice per pause, fewer per episode
    # Drops only ever hit droppable types.
    assert set(dropped) <= {"signal", "presence"}, dropped
    assert idle_after <= bound, (idle_before, idle_after)
    await asyncio.gather(*(c.close() for c in (*senders, *receivers, *sig, probe)))
