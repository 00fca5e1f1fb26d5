"""Stage refusals against a real Serve deployment (README, "Load management").

A second small Serve application in the session's Ray (its own database and data_dir,
under /refusals) hosts its stages in one replica that takes one call at a time and queues
at most one more (``max_ongoing_requests: 1``, ``max_queued_requests: 1``). The gateway
runs one batch at a time per message type, so chat, signal and receipt batches arriving
together exceed that, and Serve refuses the surplus with ``BackPressureError``. Durable
batches (chat, receipt) must then be retried until they pass; droppable ones (signal)
are dropped, counted against the refusing host, and their senders told ``overloaded``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from client import WsClient, create_chat
from tests.conftest import E2E_SETTINGS, SMALL, App, side_app

pytestmark = pytest.mark.e2e

APP_NAME = "refusals"
PAIRS = 6            # sender -> receiver pairs, each pair with its own chat
PER_ROUND = 4        # chat messages and signals each sender sends per round
MAX_ROUNDS = 20      # load stops as soon as both refusal paths were seen
REFUSING_HOST = "stages"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def refusals_app(conveyor: App, new_database: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """The app with a stage host that refuses whatever it cannot take at once."""
    data_dir: Path = tmp_path_factory.mktemp("refusals")
    settings = {**E2E_SETTINGS, "data_dir": str(data_dir),
                "database_url": new_database("refusals"), "mail_dir": str(data_dir / "mail"),
                # Credits out of play: only stage refusals may turn anything away.
                "credit_costs": {"chat": 0, "signal": 0, "command": 0, "attachment": 0}}
    stages = {**SMALL, "num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1}
    with side_app(conveyor, APP_NAME, settings, options={"stages": stages}) as app:
        yield app


@pytest.fixture
async def refusals_db(refusals_app: App) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(refusals_app.dsn)
    yield conn
    await conn.close()


async def scrape(app: App) -> Samples:
    async with httpx.AsyncClient(base_url=app.base_url) as http:
        r = await http.get("/metrics")
    assert r.status_code == 200, r.text
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(v for (n, lb), v in samples.items()
               if n == name and all(dict(lb).get(k) == val for k, val in match.items()))


async def until(pred: Callable[[], bool], timeout: float) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` seconds passed (a bounded wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


class Peer:
    """A socket read continuously in the background; a receiver receipts every message."""

    def __init__(self, client: WsClient, receipts: bool) -> None:
        self.client = client
        self.receipts = receipts
        self.frames: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.client.ws:
                frame = orjson.loads(raw)
                self.frames.append(frame)
                if self.receipts and frame["type"] == "message":
                    await self.client.receipt([frame["messageId"]])
        except websockets.ConnectionClosed:
            pass

    def acks(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for f in self.frames:
            if f["type"] == "ack":
                out.setdefault(f["id"], []).append(f)
        return out

    def messages(self, chat_id: str) -> list[dict[str, Any]]:
        """Messages of a chat in arrival order, each once (a redelivery repeats one)."""
        seen: dict[str, dict[str, Any]] = {}
        for f in self.frames:
            if f["type"] == "message" and f.get("chatId") == chat_id:
                seen.setdefault(f["messageId"], f)
        return list(seen.values())

    def signal_ids(self) -> list[str]:
        return [f["id"] for f in self.frames if f["type"] == "signal"]

    async def close(self) -> None:
        await self.client.close()
        await self.task


async def test_a_refusing_stage_host_retries_durable_batches_and_drops_signals(
    refusals_app: App, refusals_db: asyncpg.Connection
) -> None:
    app = refusals_app
    await asyncio.sleep(1.0)  # counters of earlier tests pushed (metrics_push_s 0.5)
    before = await scrape(app)

    def moved(after: Samples, name: str, **match: str) -> float:
        return total(after, name, **match) - total(before, name, **match)

    async def make_pair() -> tuple[str, Peer, Peer]:
        s, r = user(), user()
        chat = await create_chat(app.base_url, app.token(s), [r])
        sender = await WsClient.connect(app.ws_url, app.token(s))
        receiver = await WsClient.connect(app.ws_url, app.token(r))
        return chat, Peer(sender, receipts=False), Peer(receiver, receipts=True)

    made = await asyncio.gather(*(make_pair() for _ in range(PAIRS)))
    chats = [m[0] for m in made]
    senders = [m[1] for m in made]
    receivers = [m[2] for m in made]
    sent_chat: list[list[str]] = [[] for _ in range(PAIRS)]    # client ids, in send order
    sent_signal: list[list[str]] = [[] for _ in range(PAIRS)]

    async def send_round(k: int, rnd: int) -> None:
        s, to = senders[k], receivers[k].client.user_id
        for i in range(PER_ROUND):
            cid, sid = f"c{rnd}-{i}", f"s{rnd}-{i}"
            sent_chat[k].append(cid)
            sent_signal[k].append(sid)
            await s.client.chat(chats[k], f"round {rnd} item {i}", client_id=cid)
            await s.client.send({"type": "signal", "id": sid, "to": to,
                                 "payload": {"round": rnd, "item": i}})

    def all_acked() -> bool:
        return all(set(sent_chat[k]) | set(sent_signal[k]) <= senders[k].acks().keys()
                   for k in range(PAIRS))

    def rejected_signals() -> list[tuple[int, dict[str, Any]]]:
        return [(k, a) for k in range(PAIRS) for sid in sent_signal[k]
                for a in senders[k].acks().get(sid, []) if a["status"] == "rejected"]

    rounds = 0
    retries = 0.0
    for rnd in range(MAX_ROUNDS):
        rounds = rnd + 1
        await asyncio.gather(*(send_round(k, rnd) for k in range(PAIRS)))
        assert await until(all_acked, 30), f"round {rnd}: not every frame was acked"
        if rejected_signals():
            after = await scrape(app)
            retries = moved(after, "conveyor_stage_retries_total")
            if retries > 0:
                break
    rejected = rejected_signals()
    assert rejected, f"no signal was refused in {rounds} rounds"

    # Chat (durable): every frame got exactly one ack, accepted; none was dropped.
    for k in range(PAIRS):
        acks = senders[k].acks()
        for cid in sent_chat[k]:
            assert [a["status"] for a in acks[cid]] == ["accepted"], (cid, acks[cid])
    # Delivered to the receiver once each, in the order sent, with seq 1..n without holes.
    n = rounds * PER_ROUND
    assert await until(lambda: all(len(r.messages(c)) == n for r, c in zip(
        receivers, chats, strict=True)), 30), "not every accepted message was delivered"
    for k in range(PAIRS):
        got = receivers[k].messages(chats[k])
        assert [m["seq"] for m in got] == list(range(1, n + 1))
        assert [m["body"] for m in got] == [f"round {r} item {i}" for r in range(rounds)
                                            for i in range(PER_ROUND)]
        acks = senders[k].acks()
        assert [acks[cid][0]["seq"] for cid in sent_chat[k]] == list(range(1, n + 1))
        assert {m["messageId"] for m in got} == {acks[cid][0]["messageId"]
                                                for cid in sent_chat[k]}
        # Stored once each: a retried batch wrote nothing twice.
        rows = await refusals_db.fetch(
            "SELECT seq, client_id FROM messages WHERE chat_id=$1 ORDER BY seq", chats[k])
        assert [(r["seq"], r["client_id"]) for r in rows] == list(
            zip(range(1, n + 1), sent_chat[k], strict=True))

    # Signals (droppable): exactly one ack each, accepted or rejected/overloaded; the
    # refused ones never reached the receiver.
    rejected_ids: set[tuple[int, str]] = set()
    accepted_ids: set[tuple[int, str]] = set()
    for k in range(PAIRS):
        acks = senders[k].acks()
        for sid in sent_signal[k]:
            assert len(acks[sid]) == 1, (sid, acks[sid])
            a = acks[sid][0]
            if a["status"] == "rejected":
                assert a["error"]["code"] == "overloaded", a
                rejected_ids.add((k, sid))
            else:
                assert a["status"] == "accepted", a
                accepted_ids.add((k, sid))
    received_ids = {(k, sid) for k in range(PAIRS) for sid in receivers[k].signal_ids()}
    assert not received_ids & rejected_ids, sorted(received_ids & rejected_ids)[:5]
    assert received_ids <= accepted_ids

    # The counters agree (the telemetry actor is shared with the session's app: deltas).
    def counted(samples: Samples) -> tuple[float, float, float]:
        return (moved(samples, "conveyor_stage_retries_total"),
                moved(samples, "conveyor_dropped_total", type="signal", stage=REFUSING_HOST,
                      reason="stage_refused"),
                moved(samples, "conveyor_acks_total", type="signal", status="rejected"))

    after = await scrape(app)
    for _ in range(50):  # counters are pushed every metrics_push_s: a bounded wait
        retries, drops, rejected_acks = counted(after)
        if retries >= 1 and drops >= len(rejected_ids) and rejected_acks >= len(rejected_ids):
            break
        await asyncio.sleep(0.2)
        after = await scrape(app)
    retries, drops, rejected_acks = counted(after)
    assert retries >= 1, "no durable batch was retried"
    assert drops >= len(rejected_ids) and rejected_acks >= len(rejected_ids), (
        drops, rejected_acks, len(rejected_ids))
    # Every signal dropped at the host was either acked rejected or (refused after its
    # ack, at forward_signal) accepted and never forwarded: none went missing unannounced.
    assert drops <= len(rejected_ids) + len(accepted_ids - received_ids), (
        drops, len(rejected_ids), len(accepted_ids - received_ids))
    for durable in ("chat", "receipt", "command", "attachment"):
        assert moved(after, "conveyor_dropped_total", type=durable) == 0, durable
    print(f"\nREFUSALS rounds={rounds} signals={PAIRS * rounds * PER_ROUND} "
          f"rejected={len(rejected_ids)} dropped={drops:g} retries={retries:g}")

    # No late second ack for anything.
    await asyncio.sleep(0.3)
    for k in range(PAIRS):
        acks = senders[k].acks()
        assert all(len(acks[i]) == 1 for i in (*sent_chat[k], *sent_signal[k]))
    await asyncio.gather(*(p.close() for p in (*senders, *receivers)))
