"""A gateway replica being replaced tells its clients to reconnect; nothing is lost."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from ray import serve

from client import WsClient
from serve_app.app import build_graph
from tests.client import chat_of_two
from tests.conftest import E2E_STAGE_OPTIONS, App

pytestmark = [pytest.mark.e2e, pytest.mark.disruptive]


async def test_rolling_update_sends_reconnect_and_pending_messages_survive(conveyor: App) -> None:
    chat, _, bob, a, b = await chat_of_two(conveyor)
    ack = await a.ack(await a.chat(chat, "before the rollover"))
    await b.message(messageId=ack["messageId"])  # received, deliberately not receipted

    # A new version of the gateway (different CPU share) replaces both replicas.
    cpu = {"ray_actor_options": {"num_cpus": 0.11}}
    app = build_graph(dict(conveyor.settings), options={
        "Gateway": {"num_replicas": 2, **cpu}, "stages": E2E_STAGE_OPTIONS})
    deploying = asyncio.create_task(asyncio.to_thread(serve.run, app, name="conveyor",
                                                      route_prefix="/"))

    notice = await b.expect(lambda f: f["type"] == "system" and f["event"] == "reconnect", 90)
    assert notice["data"]["reason"]
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await b.drain(10)
        await b.ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012

    # Reconnecting (to a new replica), Bob gets the message he never receipted.
    for _ in range(60):
        try:
            b2 = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
            break
        except Exception:
            await asyncio.sleep(1)
    again = await b2.message(messageId=ack["messageId"], timeout=30)
    assert again["seq"] == 1 and again["body"] == "before the rollover"
    await b2.close()
    await deploying
