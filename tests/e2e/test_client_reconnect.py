"""The protocol client (``client/``) against the Serve app: reconnect with catch-up, and
waiting for a reply that never comes."""

from __future__ import annotations

import pytest

from client import ReplyTimeout, ServerError, WsClient
from tests.client import chat_of_two, user
from tests.conftest import App

pytestmark = pytest.mark.e2e

MISSED = 7


async def test_reconnect_catches_up_exactly_the_missed_messages_in_seq_order(conveyor: App) -> None:
    chat, _, bob, a, b = await chat_of_two(conveyor)
    before = await a.request({"type": "chat", "chatId": chat, "body": "before"})
    seen = await b.next_message(chat)
    assert seen["messageId"] == before["messageId"] and seen["seq"] == 1
    await b.receipt([seen["messageId"]])
    await b.close()

    acks = [await a.ack(await a.chat(chat, f"while away {i}")) for i in range(MISSED)]
    assert all(x["status"] == "accepted" for x in acks)

    tokens_minted = []

    def fresh_token() -> str:
        tokens_minted.append(1)
        return conveyor.token(bob)

    caught = await b.reconnect(fresh_token)
    assert tokens_minted == [1] and b.user_id == bob
    missed = caught[chat]
    assert [m["seq"] for m in missed] == list(range(2, MISSED + 2))
    assert [m["messageId"] for m in missed] == [x["messageId"] for x in acks]
    assert [m["body"] for m in missed] == [f"while away {i}" for i in range(MISSED)]
    assert b.seqs.highest(chat) == MISSED + 1

    # Nothing is handed out twice: a second catch-up finds nothing, and the next new
    # message is the one sent now, not a redelivery of the caught-up ones (the server
    # pushes those again until the receipt lands; the client skips them).
    await b.receipt([missed[-1]["messageId"]])
    assert await b.catch_up() == {chat: []}
    after = await a.request({"type": "chat", "chatId": chat, "body": "after"})
    nxt = await b.next_message(chat, timeout=15)
    assert nxt["messageId"] == after["messageId"] and nxt["seq"] == MISSED + 2
    await a.close()
    await b.close()


async def test_catch_up_covers_a_watched_chat_and_counts_own_messages_as_seen(
    conveyor: App
) -> None:
    chat, _, _, a, b = await chat_of_two(conveyor)
    mine = [await a.request({"type": "chat", "chatId": chat, "body": f"a{i}"}) for i in range(3)]
    # Bob sends too; Alice has not read his message yet, so it is her one missed event.
    theirs = await b.request({"type": "chat", "chatId": chat, "body": "from bob"})
    caught = await a.reconnect()
    assert [m["messageId"] for m in caught[chat]] == [theirs["messageId"]]
    assert a.seqs.floor(chat) == len(mine) + 1

    # A chat the client never heard of is covered once watched, from the seq given.
    other, _, _, c, d = await chat_of_two(conveyor)
    for i in range(4):
        await c.request({"type": "chat", "chatId": other, "body": f"c{i}"})
    d.watch(other, after_seq=2)
    caught = await d.catch_up([other])
    assert [m["seq"] for m in caught[other]] == [3, 4]
    for x in (a, b, c, d):
        await x.close()


async def test_awaiting_an_ack_for_an_id_never_sent_times_out_with_a_clear_error(
    conveyor: App
) -> None:
    c = await WsClient.connect(conveyor.ws_url, conveyor.token(user()))
    with pytest.raises(ReplyTimeout, match="ack for id 'never-sent'") as info:
        await c.ack("never-sent", timeout=0.5)
    assert isinstance(info.value, TimeoutError) and info.value.timeout == 0.5
    await c.ping()  # the connection is still usable
    await c.close()


async def test_sync_refused_for_a_non_member_raises_the_server_code(conveyor: App) -> None:
    chat, _, _, a, b = await chat_of_two(conveyor)
    eve = await WsClient.connect(conveyor.ws_url, conveyor.token(user()))
    with pytest.raises(ServerError) as info:
        await eve.sync(chat)
    assert info.value.code == "forbidden"
    for x in (a, b, eve):
        await x.close()
