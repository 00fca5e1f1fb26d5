"""Steady, bounded chat load whose every frame is recorded in a :class:`History`.

A few chats, each with a few senders and readers. Each sender sends its messages at a fixed
rate (an open loop: the schedule does not wait for acks); every member reads its socket all
the time, answers deliveries with receipts and keeps unacked frames pending. Clients behave
as the protocol asks of them:

- a frame without an answer after ``ack_timeout_s``, or refused with a retryable code
  (``credits_exhausted``, ``overloaded``) after its ``retryAfter``, is sent again with the
  same client id;
- a connection that drops is opened again (backing off while the gateway is unreachable),
  each chat catches up with ``sync`` from its last complete seq, and every pending frame is
  sent again with the same id.

:meth:`ChatLoad.run` returns once every frame is settled and every member got every acked
message (or ``settle_s`` passed); :meth:`ChatLoad.finish` then reads what the server holds
(history, receipt pointers) into the history for the checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from client import ClientError, HttpClient, WsClient, create_chat
from tests.chaos.history import History, body_for

Frame = dict[str, Any]
RETRYABLE = ("credits_exhausted", "overloaded")
# What a client may meet while the server is partly down: it retries.
TRANSIENT = (ClientError, ConnectionClosed, InvalidHandshake, OSError, TimeoutError)
PNG = b"\x89PNG\r\n\x1a\n"  # what a declared image/png must start with


@dataclass
class Shape:
    """How much load: ``chats`` × (``senders`` + ``readers``) users, ``messages`` per
    sender at ``rate`` per second each, and ``attachments`` per sender spread over the
    run (announced, uploaded, confirmed with ``/complete``)."""

    chats: int = 2
    senders: int = 2
    readers: int = 1
    messages: int = 100
    rate: float = 10.0
    ack_timeout_s: float = 8.0
    receipt_every_s: float = 0.2
    settle_s: float = 90.0
    attachments: int = 0


@dataclass
class Pending:
    chat: str
    body: str
    sent_at: float  # last attempt (0: send at the next chance)


@dataclass
class Peer:
    """One user and its connection; senders also send, everyone reads."""

    user: str
    chats: list[str]
    sends: int = 0
    client: WsClient | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    pending: dict[str, Pending] = field(default_factory=dict)
    acked: dict[str, Frame] = field(default_factory=dict)  # client id -> first acked answer
    refused: dict[str, Frame] = field(default_factory=dict)
    got: set[str] = field(default_factory=set)  # message ids received (live or catch-up)
    to_receipt: list[str] = field(default_factory=list)
    announcing: dict[str, asyncio.Future[Frame]] = field(default_factory=dict)  # attachment acks
    uploads: int = 0  # attachments still on their way (announce, upload, complete)
    reconnects: int = 0
    lost_at: list[float] = field(default_factory=list)  # when each connection broke
    back_at: list[float] = field(default_factory=list)  # when each reconnect completed


class ChatLoad:
    """One run of :class:`Shape` against the application at ``ws_url``/``base_url``."""

    def __init__(self, base_url: str, ws_url: str, token: Callable[[str], str], shape: Shape,
                 history: History | None = None, tag: str = "") -> None:
        self.base_url = base_url
        self.ws_url = ws_url
        self.token = token
        self.shape = shape
        self.history = history or History()
        self.tag = tag or f"{random.getrandbits(24):06x}"
        self.peers: list[Peer] = []
        self.chat_members: dict[str, list[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.started = 0.0
        # Attachment messages the server said it stored: (message id, chat, uploader).
        self.files: list[tuple[str, str, str]] = []

    # --- setting up ---------------------------------------------------------------------
    async def open(self) -> None:
        """Create the chats and connect every member."""
        s = self.shape
        by_user: dict[str, Peer] = {}
        for c in range(s.chats):
            senders = [f"cs{self.tag}-{c}-{i}" for i in range(s.senders)]
            readers = [f"cr{self.tag}-{c}-{i}" for i in range(s.readers)]
            chat = await create_chat(self.base_url, self.token(senders[0]), senders[1:] + readers)
            self.chat_members[chat] = senders + readers
            self.history.members[chat] = set(senders + readers)
            for u in senders + readers:
                peer = by_user.setdefault(u, Peer(u, []))
                peer.chats.append(chat)
                peer.sends += s.messages if u in senders else 0
        self.peers = list(by_user.values())
        await asyncio.gather(*(self._connect(p) for p in self.peers))

    async def _connect(self, peer: Peer) -> None:
        client = await WsClient.connect(self.ws_url, lambda: self.token(peer.user))
        self.history.attach(peer.user, client)
        for chat in peer.chats:
            client.watch(chat)
        peer.client = client
        peer.connected.set()

    # --- running ------------------------------------------------------------------------
    async def run(self, during: Callable[[], Awaitable[None]] | None = None) -> None:
        """Send the load, running ``during`` alongside it (the fault), then wait until
        every frame is settled and delivered, or ``settle_s`` passed."""
        self.started = time.monotonic()
        for p in self.peers:
            self._tasks += [asyncio.create_task(self._read(p)),
                            asyncio.create_task(self._receipts(p)),
                            asyncio.create_task(self._resend(p))]
        senders = [asyncio.create_task(self._send(p)) for p in self.peers if p.sends]
        senders += [asyncio.create_task(self._attach(p, k)) for p in self.peers if p.sends
                    for k in range(self.shape.attachments)]
        try:
            if during is not None:
                await asyncio.gather(during(), *senders)
            else:
                await asyncio.gather(*senders)
            deadline = time.monotonic() + self.shape.settle_s
            while True:
                if self._settled() or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
        except BaseException:
            await self.stop()
            raise

    def _settled(self) -> bool:
        """No frame or upload pending, and every acked message and every attachment
        message the server stored reached every other member."""
        if any(p.pending or p.uploads for p in self.peers):
            return False
        acked = [(str(a["messageId"]), str(a.get("chatId")), p.user)
                 for p in self.peers for a in p.acked.values()] + self.files
        return all(mid in p.got for p in self.peers for mid, chat, sender in acked
                   if sender != p.user and chat in p.chats)

    async def _send(self, peer: Peer) -> None:
        interval = 1.0 / self.shape.rate
        t0 = time.monotonic()
        for i in range(peer.sends):
            await asyncio.sleep(max(0.0, t0 + i * interval - time.monotonic()))
            chat = peer.chats[i % len(peer.chats)]
            cid = f"{peer.user}-{i}"
            peer.pending[cid] = Pending(chat, body_for(cid, f"#{i}"), 0.0)
            await self._attempt(peer, cid)

    async def _attempt(self, peer: Peer, cid: str) -> None:
        item = peer.pending.get(cid)
        if item is None or not peer.connected.is_set() or peer.client is None:
            return  # sent (again) once connected
        item.sent_at = time.monotonic()
        with contextlib.suppress(*TRANSIENT):
            await peer.client.chat(item.chat, item.body, cid)

    # --- attachments ----------------------------------------------------------------------
    async def _attach(self, peer: Peer, k: int) -> None:
        """The ``k``-th attachment of ``peer``, due at its share of the run: announced
        (resent with the same id until acked), uploaded, and confirmed with ``/complete``
        until the server says ready or refused."""
        s = self.shape
        peer.uploads += 1
        try:
            await asyncio.sleep((k + 0.5) * s.messages / s.rate / s.attachments)
            cid = f"{peer.user}-a{k}"
            data = PNG + os.urandom(56)
            chat = peer.chats[k % len(peer.chats)]
            ack = await self._announce(peer, cid, chat, len(data))
            if ack.get("status") not in ("accepted", "duplicate"):
                return
            aid = str(ack["attachmentId"])
            async with httpx.AsyncClient(timeout=10) as http:
                await self._until_ok(lambda: http.put(
                    ack["uploadUrl"], content=data, headers={"Content-Type": "image/png"}),
                    lambda r: r.status_code < 300)
                self.history.uploaded.add(aid)
                done = await self._until_ok(lambda: self._complete(http, peer, aid, ack),
                                            lambda r: r.status_code in (200, 410, 422))
                if done is not None and done.status_code == 200 and done.json().get("messageId"):
                    self.files.append((str(done.json()["messageId"]), chat, peer.user))
        finally:
            peer.uploads -= 1

    async def _announce(self, peer: Peer, cid: str, chat: str, size: int) -> Frame:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shape.settle_s
        while True:
            fut: asyncio.Future[Frame] = loop.create_future()
            peer.announcing[cid] = fut
            if peer.connected.is_set() and peer.client is not None:
                with contextlib.suppress(*TRANSIENT):
                    await peer.client.attachment(chat, f"{cid}.png", "image/png", size, cid)
            try:
                return await asyncio.wait_for(fut, self.shape.ack_timeout_s)
            except TimeoutError:
                if loop.time() > deadline:
                    raise

    async def _complete(self, http: httpx.AsyncClient, peer: Peer, aid: str,
                        ack: Frame) -> httpx.Response:
        return await http.post(f"{self.base_url}/v1/attachments/{aid}/complete", headers={
            "Authorization": f"Bearer {self.token(peer.user)}",
            "X-Upload-Token": str(ack["uploadToken"])})

    async def _until_ok(self, call: Callable[[], Awaitable[httpx.Response]],
                        ok: Callable[[httpx.Response], bool]) -> httpx.Response | None:
        """``call`` until ``ok`` (retrying errors and other answers, as a client would),
        for at most ``settle_s``; the last answer."""
        deadline = time.monotonic() + self.shape.settle_s
        last = None
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                last = await call()
                if ok(last):
                    return last
            await asyncio.sleep(0.5)
        return last

    async def attachment_states(self) -> None:
        """Each uploaded attachment's state as ``/complete`` tells it now: ``ready``, the
        refusal's code (422), or the state it is stuck in."""
        async with httpx.AsyncClient(timeout=30) as http:
            for aid in sorted(self.history.uploaded):
                peer = next(p for p in self.peers if any(
                    e.user == p.user and e.frame.get("attachmentId") == aid
                    for e in self.history.events))
                ack = next(e.frame for e in self.history.events
                           if e.user == peer.user and e.frame.get("attachmentId") == aid
                           and e.frame.get("type") == "ack")
                try:
                    r = await self._complete(http, peer, aid, ack)
                except httpx.HTTPError as exc:
                    self.history.attachments[aid] = f"unreachable: {exc}"
                    continue
                body = r.json()
                if r.status_code == 422:
                    state = str((body.get("error") or {}).get("code"))
                else:
                    state = str(body.get("state") or f"http {r.status_code}")
                self.history.attachments[aid] = state

    async def _resend(self, peer: Peer) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for cid, item in list(peer.pending.items()):
                if item.sent_at == 0.0 or now - item.sent_at > self.shape.ack_timeout_s:
                    await self._attempt(peer, cid)

    async def _receipts(self, peer: Peer) -> None:
        while True:
            await asyncio.sleep(self.shape.receipt_every_s)
            if not peer.to_receipt or not peer.connected.is_set() or peer.client is None:
                continue
            ids, peer.to_receipt = peer.to_receipt, []
            try:
                await peer.client.receipt(ids, "delivered")
                await peer.client.receipt(ids[-1:], "read")
            except TRANSIENT:
                peer.to_receipt = ids + peer.to_receipt

    async def _read(self, peer: Peer) -> None:
        while True:
            client = peer.client
            assert client is not None
            try:
                frame = await client.expect(lambda f: True, timeout=3600)
            except TRANSIENT:
                await self._reconnect(peer)
                continue
            self._handle(peer, frame)

    def _handle(self, peer: Peer, f: Frame) -> None:
        kind = f.get("type")
        waiting = peer.announcing.get(str(f.get("id")))
        if kind in ("ack", "error") and waiting is not None and not waiting.done():
            waiting.set_result(f)
        if kind == "message":
            peer.got.add(str(f["messageId"]))
            peer.to_receipt.append(str(f["messageId"]))
        elif kind in ("ack", "error") and f.get("id") in peer.pending:
            cid = str(f["id"])
            if kind == "ack" and f.get("status") in ("accepted", "duplicate"):
                peer.acked.setdefault(cid, f)
                del peer.pending[cid]
            elif kind == "ack" and (f.get("error") or {}).get("code") in RETRYABLE:
                retry = float((f.get("error") or {}).get("retryAfter") or 1.0)
                # Due again after retryAfter: backdate the attempt so _resend picks it then.
                peer.pending[cid].sent_at = time.monotonic() + retry - self.shape.ack_timeout_s
            else:
                peer.refused[cid] = f
                del peer.pending[cid]

    async def _reconnect(self, peer: Peer) -> None:
        """Reconnect until it works, catch up, and send every pending frame again."""
        peer.connected.clear()
        peer.lost_at.append(time.monotonic())
        client = peer.client
        assert client is not None
        delay = 0.2
        while True:
            try:
                missed = await client.reconnect(lambda: self.token(peer.user))
                break
            except TRANSIENT:
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        peer.reconnects += 1
        peer.back_at.append(time.monotonic())
        for items in missed.values():
            for m in items:
                if m.get("type", "message") == "message":
                    peer.got.add(str(m["messageId"]))
                    peer.to_receipt.append(str(m["messageId"]))
        for item in peer.pending.values():
            item.sent_at = 0.0
        peer.connected.set()

    def drop(self, peer: Peer) -> None:
        """Cut ``peer``'s connection without a closing handshake (as a lost network does);
        its reader reconnects."""
        if peer.client is not None and peer.connected.is_set():
            peer.client.ws.transport.abort()

    # --- after the run --------------------------------------------------------------------
    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def finish(self) -> None:
        """Stop the clients and read what the server holds into the history: each chat's
        stored history and each member's receipt pointers."""
        await self.stop()
        if self.history.uploaded:
            await self.attachment_states()
        for chat, members in self.chat_members.items():
            async with HttpClient(self.base_url, self.token(members[0])) as http:
                self.history.stored[chat] = await http.history_all(chat)
            for user in members:
                async with HttpClient(self.base_url, self.token(user)) as http:
                    mine = next(c for c in await http.chats() if c["chatId"] == chat)
                self.history.pointers[(chat, user)] = (int(mine.get("deliveredSeq") or 0),
                                                       int(mine.get("readSeq") or 0))
        await asyncio.gather(*(p.client.close() for p in self.peers if p.client is not None),
                             return_exceptions=True)

    def counts(self) -> dict[str, Any]:
        """The clients' side of the run: reconnects, frames still pending, and the longest
        a client was without a connection (lost → reconnected and caught up)."""
        gaps = [b - a for p in self.peers for a, b in zip(p.lost_at, p.back_at, strict=False)]
        return {"reconnects": sum(p.reconnects for p in self.peers),
                "pendingAtEnd": sum(len(p.pending) for p in self.peers),
                "longestOfflineS": round(max(gaps), 2) if gaps else 0.0}
