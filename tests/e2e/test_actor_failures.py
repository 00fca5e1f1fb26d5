"""Shared-state actors may die; the service keeps serving."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import ray

from tests.client import WsClient, create_chat
from tests.conftest import App

pytestmark = [pytest.mark.e2e, pytest.mark.disruptive]


def user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


async def test_chat_keeps_flowing_when_the_credit_bank_and_hub_actors_die(conveyor: App) -> None:
    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    b = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    first = await a.ack(await a.chat(chat, "before"))
    await b.receipt([(await b.message(messageId=first["messageId"]))["messageId"]])

    # The credit shard dies: it is restarted with full buckets; messages keep being accepted.
    ray.kill(ray.get_actor("conveyor-credits-0", namespace="conveyor"), no_restart=False)
    # The hub dies: it restarts empty and every gateway attaches its sockets again.
    ray.kill(ray.get_actor("conveyor-hub-0", namespace="conveyor"), no_restart=False)

    ack = None
    for i in range(40):
        ack = await a.ack(await a.chat(chat, f"after {i}"), timeout=30)
        if ack["status"] == "accepted":
            break
        await asyncio.sleep(0.5)
    assert ack is not None and ack["status"] == "accepted"
    # Delivered live once the hub is back and the gateways re-attached (or by redelivery).
    msg = await b.message(messageId=ack["messageId"], timeout=30)
    assert msg["body"].startswith("after")
    await a.close()
    await b.close()
