"""Shared-state actors may die; the service keeps serving."""

from __future__ import annotations

import asyncio

import pytest
import ray

from client import WsClient, create_chat
from tests.client import user
from tests.conftest import App
from tests.e2e.test_metrics_overload import scrape, total

pytestmark = [pytest.mark.e2e, pytest.mark.disruptive]


def kill_all(kind: str, shards: int) -> None:
    for i in range(shards):
        ray.kill(ray.get_actor(f"conveyor-{kind}-{i}", namespace="conveyor"), no_restart=False)


async def test_chat_keeps_flowing_when_the_credit_bank_and_hub_actors_die(conveyor: App) -> None:
    alice, bob, carol = user(), user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob, carol])
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    b = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    first = await a.ack(await a.chat(chat, "before"))
    await b.receipt([(await b.message(messageId=first["messageId"]))["messageId"]])
    await a.drain(0.5)
    await b.drain(0.0)

    retries_before = total(await scrape(conveyor), "conveyor_stage_retries_total")

    async def keep_sending() -> list[str]:
        ids = []
        for i in range(40):
            ids.append(await a.chat(chat, f"after {i}"))
            await asyncio.sleep(0.05)
        return ids

    sending = asyncio.create_task(keep_sending())
    await asyncio.sleep(0.5)
    # Every credit shard dies: restarted with full buckets; messages keep being accepted.
    kill_all("credits", conveyor.settings["credit_shards"])
    # Every hub shard dies while messages are on their way: deliveries fail until the
    # hubs are back (their batches are retried), and every gateway attaches its sockets
    # again. A socket opened meanwhile is served: its attach is retried by the pull loop.
    kill_all("hub", conveyor.settings["hub_shards"])
    c = await WsClient.connect(conveyor.ws_url, conveyor.token(carol))
    ids = await sending

    acks = [await a.ack(i, timeout=30) for i in ids]
    assert [x["status"] for x in acks] == ["accepted"] * 40, acks
    assert [x["seq"] for x in acks] == list(range(2, 42))
    # Exactly one ack per frame: a batch retried after a failed delivery resumes at the
    # delivery, it does not run (and ack, as "duplicate") again.
    frames = await a.drain(3.0)
    assert [f for f in frames if f["type"] == "ack"] == []

    # Delivered live once the hubs are back and the gateways re-attached (or by redelivery).
    for x in acks:
        assert (await b.message(messageId=x["messageId"], timeout=30))["body"].startswith("after")
        assert (await c.message(messageId=x["messageId"], timeout=30))["body"].startswith("after")

    # Re-attaching after the restart is a presence change: at least one of the two sees
    # the other back online (whichever gateway re-attached last finds the other attached).
    def back_online(who: str) -> bool:
        return any(f["type"] == "system" and f["event"] == "presence" and f["data"]["online"]
                   and f["data"]["userId"] == who for f in frames)

    frames += await a.drain(1.0) + await b.drain(1.0)
    assert back_online(alice) or back_online(bob)
    retries = total(await scrape(conveyor), "conveyor_stage_retries_total") - retries_before
    print(f"\nstage retries while the hubs restarted: {retries:g}")
    for client in (a, b, c):
        await client.close()


async def test_signals_pass_while_the_dedup_shards_restart(conveyor: App) -> None:
    alice, bob = user(), user()
    await create_chat(conveyor.base_url, conveyor.token(alice), [bob])  # signals: contacts
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    b = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    kill_all("dedup", conveyor.settings["dedup_shards"])
    for i in range(5):
        await a.send({"type": "signal", "id": f"t{i}", "to": bob, "payload": {"typing": True}})
    assert [(await a.ack(f"t{i}", timeout=30))["status"] for i in range(5)] == ["accepted"] * 5
    got = [await b.expect(lambda f: f["type"] == "signal", timeout=30) for _ in range(5)]
    assert sorted(f["id"] for f in got) == [f"t{i}" for i in range(5)]
    await a.close()
    await b.close()
