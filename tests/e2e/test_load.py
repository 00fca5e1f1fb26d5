"""Credits, signals, presence and system frames against the running Serve app."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import ray

from client import WsClient, create_chat
from cluster.sharding import shard_of
from tests.client import chat_of_two, user
from tests.conftest import App
from tests.e2e.test_metrics_overload import scrape, total

pytestmark = pytest.mark.e2e


async def counter_moves(app: App, name: str, before: float, by: float, **match: str) -> float:
    """Scrape until ``name`` has moved by at least ``by`` (processes push every
    ``metrics_push_s``); returns how far it moved."""
    moved = 0.0
    for _ in range(20):
        moved = total(await scrape(app), name, **match) - before
        if moved >= by:
            break
        await asyncio.sleep(0.5)
    return moved


async def test_credits_run_out_with_retry_after_and_a_system_notice(conveyor: App) -> None:
    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    rejections_before = total(await scrape(conveyor), "conveyor_credit_rejections_total",
                              type="chat")
    ids = [await a.chat(chat, f"n{i}") for i in range(105)]  # capacity is 100
    acks = [await a.ack(i) for i in ids]
    accepted = [x for x in acks if x["status"] == "accepted"]
    rejected = [x for x in acks if x["status"] == "rejected"]
    assert len(accepted) == 100 and len(rejected) == 5
    assert all(x["error"]["code"] == "credits_exhausted" and 0 < x["error"]["retryAfter"] <= 10
               for x in rejected)
    notice = await a.expect(lambda f: f["type"] == "system" and f["event"] == "credits_exhausted")
    assert 0 < notice["data"]["retryAfter"] <= 10
    low = await a.expect(lambda f: f["type"] == "system" and f["event"] == "credits_low")
    assert low["data"]["remaining"] == 9  # sent when the bucket crossed low_water (10)...
    more = [f for f in await a.drain(0.5) if f["type"] == "system" and f["event"] == "credits_low"]
    assert more == []  # ...once, not again for the 90 messages sent below it
    # Rejected messages were not stored: seq stops at 100.
    assert max(x["seq"] for x in accepted) == 100
    assert await counter_moves(conveyor, "conveyor_credit_rejections_total", rejections_before,
                               5, type="chat") == 5
    await a.close()


async def test_signal_is_forwarded_once_and_never_stored(conveyor: App, app_db: object) -> None:
    alice, bob = user(), user()
    await create_chat(conveyor.base_url, conveyor.token(alice), [bob])  # signals: contacts
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    b = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    offer = {"type": "signal", "id": "call-1", "to": bob, "payload": {"sdp": "v=0", "kind": "offer"}}
    await a.send(offer)
    assert (await a.ack("call-1"))["status"] == "accepted"
    got = await b.expect(lambda f: f["type"] == "signal")
    assert got == {"type": "signal", "id": "call-1", "from": alice, "payload": offer["payload"]}
    await a.send(offer)  # resent: duplicate, not forwarded again
    assert (await a.ack("call-1"))["status"] == "duplicate"
    await a.send({"type": "signal", "id": "typing-1", "to": bob, "payload": {"typing": True}})
    typing = await b.expect(lambda f: f["type"] == "signal")
    assert typing["id"] == "typing-1", "the duplicate offer must not arrive before this"
    await a.send({"type": "signal", "id": "bad", "to": bob, "payload": "not an object"})
    bad = await a.ack("bad")
    assert bad["status"] == "rejected" and bad["error"]["code"] == "invalid"
    assert not [f for f in await b.drain(0.5) if f["type"] == "signal"]
    await a.close()
    await b.close()


async def test_presence_frames_and_lookup_follow_connections(conveyor: App) -> None:
    alice, bob = user(), user()
    await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    b = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    a1 = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    online = await b.expect(lambda f: f["type"] == "system" and f["event"] == "presence")
    assert online["data"]["userId"] == alice and online["data"]["online"] is True
    a2 = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))  # second device
    await a1.close()
    async with httpx.AsyncClient(base_url=conveyor.base_url, headers=conveyor.auth(bob)) as http:
        await asyncio.sleep(0.5)
        users = (await http.get("/v1/presence", params={"userId": alice})).json()["users"]
        assert users == [{"userId": alice, "online": True, "lastSeen": users[0]["lastSeen"]}]
        await a2.close()
        offline = await b.expect(lambda f: f["type"] == "system" and f["event"] == "presence"
                                 and f["data"]["online"] is False)
        assert offline["data"]["userId"] == alice and offline["data"]["lastSeen"]
        users = (await http.get("/v1/presence", params={"userId": alice})).json()["users"]
        assert users[0]["online"] is False and users[0]["lastSeen"]
    await b.close()


async def test_a_silent_gateway_replica_expires_from_presence(conveyor: App) -> None:
    ghost_user, contact = user(), user()
    await create_chat(conveyor.base_url, conveyor.token(contact), [ghost_user])
    c = await WsClient.connect(conveyor.ws_url, conveyor.token(contact))
    shard = shard_of(ghost_user, conveyor.settings["hub_shards"])
    hub = ray.get_actor(f"conveyor-hub-{shard}", namespace="conveyor")
    await hub.attach.remote("ghost-replica", [("ghost-conn", ghost_user)])
    async with httpx.AsyncClient(base_url=conveyor.base_url,
                                 headers=conveyor.auth(contact)) as http:
        users = (await http.get("/v1/presence", params={"userId": ghost_user})).json()["users"]
        assert users[0]["online"] is True
        for _ in range(40):  # the test settings use gateway_ttl_s = 5
            await asyncio.sleep(0.5)
            users = (await http.get("/v1/presence", params={"userId": ghost_user})).json()["users"]
            if not users[0]["online"]:
                break
        assert users[0]["online"] is False
    # The contact hears it, as if the ghost had disconnected.
    offline = await c.expect(lambda f: f["type"] == "system" and f["event"] == "presence"
                             and f["data"]["userId"] == ghost_user, timeout=15)
    assert offline["data"]["online"] is False and offline["data"]["lastSeen"]
    await c.close()


async def test_a_message_not_receipted_is_redelivered_and_counted(conveyor: App) -> None:
    chat, _, _, a, b = await chat_of_two(conveyor)
    before = total(await scrape(conveyor), "conveyor_redeliveries_total")
    ack = await a.ack(await a.chat(chat, "are you there?"))
    first = await b.message(messageId=ack["messageId"])
    # No receipt: after redelivery_base_s (1 s in the tests) it comes again, same id.
    again = await b.message(messageId=ack["messageId"], timeout=15)
    assert (again["seq"], again["body"]) == (first["seq"], first["body"])
    await b.receipt([again["messageId"]])
    assert await counter_moves(conveyor, "conveyor_redeliveries_total", before, 1) >= 1
    await a.close()
    await b.close()


async def test_clients_cannot_send_server_only_types(conveyor: App) -> None:
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(user()))
    await a.send({"type": "presence", "id": "p1", "online": True})
    err = await a.expect(lambda f: f["type"] == "error")
    assert err["code"] == "unknown_type"
    await a.close()
