"""Abuse limits at the WebSocket gateway, with real sockets (README settings table,
PROTOCOL.md close codes).

A second small Serve application in the session's Ray (its own database and data_dir,
under /limits, one gateway replica) with tight caps: 3 open connections per user, 8
connection attempts per user and minute, 20 unreceipted messages per connection and a
2 s slow-consumer grace.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.slow_readers import replica_pids, run
from client import WsClient, create_chat
from client.errors import HandshakeRefused
from tests.conftest import E2E_SETTINGS, SMALL, App, side_app

pytestmark = pytest.mark.e2e

APP_NAME = "limits"
MAX_OPEN = 3
ATTEMPTS_PER_MINUTE = 8
WINDOW = 20
SLOW_CONSUMER_S = 2.0
SLOW_READERS = 100
MESSAGES = 100           # per chat, 4,000 characters each: 38 MiB addressed to the readers
BODY_CHARS = 4000
RSS_GROWTH_MIB = 24.0    # most a process may grow meanwhile: well below what was addressed


def user() -> str:
    return f"l-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def limits_app(conveyor: App, new_database: Any,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    data_dir: Path = tmp_path_factory.mktemp("limits")
    settings = {**E2E_SETTINGS, "data_dir": str(data_dir), "database_url": new_database("limits"),
                "mail_dir": str(data_dir / "mail"), "state_actor_prefix": "limits",
                "max_connections_per_user": MAX_OPEN,
                "connection_attempts_per_minute": ATTEMPTS_PER_MINUTE,
                "connection_unreceipted_max": WINDOW, "slow_consumer_s": SLOW_CONSUMER_S,
                # Credits out of play: the sender posts far more than a user may.
                "credit_costs": {"chat": 0, "signal": 0, "command": 0, "attachment": 0}}
    gateway = {"num_replicas": 1, "max_ongoing_requests": 2000, **SMALL}
    with side_app(conveyor, APP_NAME, settings, options={"Gateway": gateway}) as app:
        yield app


async def refused(app: App, who: str) -> HandshakeRefused:
    with pytest.raises(HandshakeRefused) as info:
        client = await WsClient.connect(app.ws_url, app.token(who))
        await client.close()
    return info.value


async def test_open_connections_beyond_the_per_user_cap_are_closed_with_4409(
        limits_app: App) -> None:
    alice = user()
    held = [await WsClient.connect(limits_app.ws_url, limits_app.token(alice))
            for _ in range(MAX_OPEN)]
    try:
        err = await refused(limits_app, alice)
        assert err.code == 4409 and f"at most {MAX_OPEN}" in str(err)
        # Someone else is not affected, nor are the connections already open.
        other = await WsClient.connect(limits_app.ws_url, limits_app.token(user()))
        await other.close()
        for client in held:
            await client.ping()
        # One closed: room for one again.
        await held.pop().close()
        await asyncio.sleep(0.3)
        held.append(await WsClient.connect(limits_app.ws_url, limits_app.token(alice)))
        await held[-1].ping()
    finally:
        for client in held:
            await client.close()


async def test_connection_attempts_beyond_the_per_minute_cap_are_closed_with_4429(
        limits_app: App) -> None:
    bob = user()
    for _ in range(ATTEMPTS_PER_MINUTE):
        client = await WsClient.connect(limits_app.ws_url, limits_app.token(bob))
        await client.close()
        await asyncio.sleep(0.1)  # the gateway sees the close before the next attempt
    err = await refused(limits_app, bob)
    retry = re.search(r"retry in (\d+) s", str(err))
    assert err.code == 4429 and retry is not None, err
    assert 1 <= int(retry[1]) <= 8  # one attempt comes back every 60 / 8 s
    other = await WsClient.connect(limits_app.ws_url, limits_app.token(user()))
    await other.close()
    await asyncio.sleep(int(retry[1]) + 0.5)
    client = await WsClient.connect(limits_app.ws_url, limits_app.token(bob))
    await client.ping()
    await client.close()


async def test_readers_that_never_read_are_closed_and_memory_stays_bounded(
        limits_app: App) -> None:
    pids = replica_pids(APP_NAME)
    assert sum(1 for label in pids if label.startswith("gateway:")) == 1, pids
    assert any(label.startswith("proxy:") for label in pids), pids
    figures = await run(limits_app.base_url, limits_app.ws_url, limits_app.token, pids,
                        readers=SLOW_READERS, messages=MESSAGES, body_chars=BODY_CHARS,
                        slow_consumer_s=SLOW_CONSUMER_S, prefix="lt")
    print("slow readers:", json.dumps(figures))
    assert figures["accepted"] == figures["sent"] == MESSAGES, figures
    # Every reader was told, then closed with 4408, having been sent at most the window.
    assert figures["closeCodes"] == {"4408": SLOW_READERS}, figures
    assert figures["slowConsumerFrames"] == SLOW_READERS, figures
    assert figures["maxDistinctMessagesPerReader"] <= WINDOW, figures
    # The reader that reads got everything, in order, meanwhile.
    assert figures["healthyReceived"] == MESSAGES and figures["healthyInOrder"], figures
    rss = figures["rssMiB"]
    for label in pids:
        grew = rss["peak"][label] - rss["connected"][label]
        assert grew < RSS_GROWTH_MIB, (label, grew, figures)
    # The gateway is healthy for others afterwards.
    async with httpx.AsyncClient(base_url=limits_app.base_url) as http:
        assert (await http.get("/health/live")).status_code == 200
    a, b = user(), user()
    chat = await create_chat(limits_app.base_url, limits_app.token(a), [b])
    async with (await WsClient.connect(limits_app.ws_url, limits_app.token(a)) as ca,
                await WsClient.connect(limits_app.ws_url, limits_app.token(b)) as cb):
        cid = await ca.chat(chat, "after the slow readers")
        assert (await ca.ack(cid))["status"] == "accepted"
        assert (await cb.message(body="after the slow readers"))["chatId"] == chat
