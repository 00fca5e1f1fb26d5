"""One WebSocket connection of the protocol (``PROTOCOL.md``, "WebSocket").

The client reads its socket only when the caller waits for something (:meth:`WsClient.expect`
and the methods built on it): frames that arrive while it waits for another one are kept,
in order, in :attr:`WsClient.inbox` for a later wait. There is no background reader, so a
caller that wants to read the raw socket itself (``async for raw in client.ws``, as the
benchmark does) may; frames read that way bypass the inbox and the seq tracking (feed them
to ``client.seqs.observe`` if catch-up should know about them).

Seq tracking: every ``message``/``command`` frame, ``sync`` reply and ``ack`` this client
hands to its caller is recorded in :attr:`WsClient.seqs`, so :meth:`WsClient.reconnect` can
fetch exactly what was missed while away.

Observing: :attr:`WsClient.on_frame`, when set, is called with ``("out", frame)`` for every
frame this client sends and ``("in", frame)`` for every frame it reads from its socket (the
``connected`` frame of each reconnect included), before anything else looks at it; frames
read from ``client.ws`` directly are not seen.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any
from urllib.parse import quote

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from client.errors import ClientError, HandshakeRefused, ProtocolError, ReplyTimeout, ServerError
from client.seqs import SeqTracker

Frame = dict[str, Any]
# A token, or a callable that mints a fresh one (called on every connect and reconnect).
TokenSource = str | Callable[[], str]
# Told of each frame sent ("out") or read ("in"); see the module's docstring.
FrameObserver = Callable[[str, Frame], None]

MAX_FRAME = 2**22
SYNC_PAGE = 200


class WsClient:
    """A connection to ``GET /v1/ws`` for one user.

    Make one with :meth:`connect`; close it with :meth:`close` (or ``async with``).
    Frames that need a client ``id`` get one from :meth:`new_id` unless given; the id is
    the server's dedup key, so resending a frame with the same id is safe.
    """

    def __init__(self, ws: ClientConnection, hello: Frame, *, url: str = "",
                 token: TokenSource = "", max_size: int = MAX_FRAME) -> None:
        self.url = url
        self._token = token
        self._max_size = max_size
        self.seqs = SeqTracker()
        self.inbox: list[Frame] = []
        # Unique per sender across processes and reconnects: a random prefix and a counter.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        self.on_frame: FrameObserver | None = None
        self._adopt(ws, hello)

    def _adopt(self, ws: ClientConnection, hello: Frame) -> None:
        self.ws = ws
        self.hello = self._seen(hello)
        data = hello.get("data") or {}
        self.user_id: str = str(data.get("userId", ""))
        self.connection_id: str = str(data.get("connectionId", ""))
        self.gateway: str = str(data.get("gateway", ""))

    # --- connecting ---------------------------------------------------------------------
    @classmethod
    async def connect(cls, ws_url: str, token: TokenSource, *, timeout: float = 10.0,
                      max_size: int = MAX_FRAME) -> WsClient:
        """Open ``ws_url`` (``ws://host:port/v1/ws``) with the token in the query and wait
        for the server's ``connected`` frame.

        Raises :class:`HandshakeRefused` (bad token: close code 4401 or HTTP 401),
        :class:`ReplyTimeout`, or :class:`ProtocolError` if the first frame is not
        ``connected``."""
        ws, hello = await _open(ws_url, _token_now(token), timeout, max_size)
        return cls(ws, hello, url=ws_url, token=token, max_size=max_size)

    async def reconnect(self, token: TokenSource | None = None, *, timeout: float = 10.0,
                        catch_up: bool = True) -> dict[str, list[Frame]]:
        """Close this socket, open a new one to the same URL (with ``token`` if given, which
        also replaces the client's token source) and, unless ``catch_up`` is false, return
        :meth:`catch_up` for every tracked chat: what was missed while away."""
        if not self.url:
            raise ClientError("this client was not opened by connect(): no URL to reconnect to")
        if token is not None:
            self._token = token
        await self.ws.close()
        ws, hello = await _open(self.url, _token_now(self._token), timeout, self._max_size)
        self._adopt(ws, hello)
        return await self.catch_up(timeout=timeout) if catch_up else {}

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> WsClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # --- sending ------------------------------------------------------------------------
    def new_id(self) -> str:
        """A fresh client id (≤ 64 characters, unique for this sender)."""
        return f"{self._id_prefix}-{next(self._ids)}"

    async def send(self, frame: Frame | str) -> None:
        """Send one frame as is (a dict is encoded as JSON; a string is sent verbatim)."""
        text = frame if isinstance(frame, str) else orjson.dumps(frame).decode()
        if self.on_frame is not None:
            try:
                parsed = frame if isinstance(frame, dict) else orjson.loads(text)
            except orjson.JSONDecodeError:
                parsed = {"raw": text}
            self.on_frame("out", parsed if isinstance(parsed, dict) else {"raw": text})
        await self.ws.send(text)

    def _seen(self, frame: Frame) -> Frame:
        """``frame``, once the observer (if any) was told it arrived."""
        if self.on_frame is not None:
            self.on_frame("in", frame)
        return frame

    async def _send_with_id(self, frame: Frame, client_id: str | None) -> str:
        cid = client_id or self.new_id()
        await self.send({**frame, "id": cid})
        return cid

    async def chat(self, chat_id: str, body: str, client_id: str | None = None) -> str:
        """Send a ``chat`` frame; returns its client id (await the ack with :meth:`ack`)."""
        return await self._send_with_id({"type": "chat", "chatId": chat_id, "body": body},
                                        client_id)

    async def signal(self, to: str, payload: dict[str, Any], client_id: str | None = None) -> str:
        """Send an ephemeral ``signal`` to user ``to``; returns its client id."""
        return await self._send_with_id({"type": "signal", "to": to, "payload": payload},
                                        client_id)

    async def attachment(self, chat_id: str, file_name: str, content_type: str, size: int,
                         client_id: str | None = None) -> str:
        """Announce an ``attachment``; its ack carries the upload URL and token."""
        return await self._send_with_id(
            {"type": "attachment", "chatId": chat_id, "fileName": file_name,
             "contentType": content_type, "size": size}, client_id)

    async def command(self, op: str, message_id: str, client_id: str | None = None,
                      **fields: Any) -> str:
        """Send a ``command`` (``edit`` with ``body=``, ``react`` with ``emoji=``,
        ``delete``) on ``message_id``; returns its client id."""
        return await self._send_with_id(
            {"type": "command", "op": op, "messageId": message_id, **fields}, client_id)

    async def receipt(self, message_ids: list[str], status: str = "delivered") -> None:
        """Acknowledge delivered messages (``delivered`` or ``read``). Receipts are
        cumulative per chat: the last message's id covers every earlier one."""
        await self.send({"type": "receipt", "messageIds": message_ids, "status": status})

    async def request(self, frame: Frame, timeout: float = 10.0) -> Frame:
        """Send ``frame`` (given an ``id`` if it has none) and return its ``ack``."""
        cid = await self._send_with_id(frame, frame.get("id"))
        return await self.ack(cid, timeout)

    # --- waiting ------------------------------------------------------------------------
    async def _take(self, pred: Callable[[Frame], bool], timeout: float, what: str) -> Frame:
        """The first frame, buffered or arriving, that satisfies ``pred``; the others that
        arrive meanwhile are buffered in order. Not recorded in :attr:`seqs`."""
        for i, f in enumerate(self.inbox):
            if pred(f):
                return self.inbox.pop(i)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    f = self._seen(orjson.loads(await self.ws.recv()))
                    if pred(f):
                        return f
                    self.inbox.append(f)
        except TimeoutError:
            raise ReplyTimeout(what, timeout) from None

    async def expect(self, pred: Callable[[Frame], bool], timeout: float = 10.0) -> Frame:
        """The first frame (already received or arriving) that satisfies ``pred``.
        Raises :class:`ReplyTimeout` (a ``TimeoutError``) after ``timeout`` seconds."""
        frame = await self._take(pred, timeout, "matching frame")
        self.seqs.observe(frame)
        return frame

    async def ack(self, client_id: str, timeout: float = 10.0) -> Frame:
        """The ``ack`` of the frame sent with ``client_id`` (whatever its status:
        ``accepted``, ``duplicate`` or ``rejected``).

        Raises :class:`ServerError` if the server answered that id with an ``error`` frame
        instead (the frame was refused before it was handled), and :class:`ReplyTimeout`
        if nothing came for it within ``timeout`` seconds."""
        frame = await self._take(
            lambda f: f.get("id") == client_id and f.get("type") in ("ack", "error"), timeout,
            f"ack for id {client_id!r} (was a frame with this id sent on this connection?)")
        if frame["type"] == "error":
            raise ServerError(str(frame.get("code")), str(frame.get("message")), detail=frame)
        self.seqs.observe(frame)
        return frame

    async def message(self, timeout: float = 10.0, **match: Any) -> Frame:
        """The first ``message`` frame whose fields equal ``match`` (e.g. ``messageId=``,
        ``chatId=``) — a redelivery included."""
        return await self.expect(
            lambda f: f["type"] == "message" and all(f.get(k) == v for k, v in match.items()),
            timeout)

    async def next_message(self, chat_id: str | None = None, timeout: float = 10.0) -> Frame:
        """The next ``message`` (of ``chat_id``, or of any chat) not seen before: a
        redelivery of one already handed out — the server repeats a message until it is
        receipted — is skipped and dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        what = f"new message in chat {chat_id!r}" if chat_id else "new message"
        while True:
            frame = await self._take(
                lambda f: f["type"] == "message" and (chat_id is None or f.get("chatId") == chat_id),
                max(0.0, deadline - loop.time()), what)
            if not self.seqs.is_seen(frame):
                self.seqs.observe(frame)
                return frame

    async def drain(self, seconds: float) -> list[Frame]:
        """Everything that arrives within ``seconds`` (plus what was already buffered)."""
        out, self.inbox = self.inbox, []
        try:
            async with asyncio.timeout(seconds):
                while True:
                    out.append(self._seen(orjson.loads(await self.ws.recv())))
        except TimeoutError:
            pass
        for frame in out:
            self.seqs.observe(frame)
        return out

    async def ping(self, timeout: float = 10.0) -> None:
        """Round trip a ``ping``; returns when the ``pong`` arrives."""
        await self.send({"type": "ping"})
        await self._take(lambda f: f["type"] == "pong", timeout, "pong")

    # --- history and catch-up -------------------------------------------------------------
    async def _sync_page(self, chat_id: str, after_seq: int, limit: int, timeout: float) -> Frame:
        sid = self.new_id()
        await self.send({"type": "sync", "id": sid, "chatId": chat_id, "afterSeq": after_seq,
                         "limit": limit})
        frame = await self._take(
            lambda f: f.get("id") == sid and f.get("type") in ("sync", "error"), timeout,
            f"sync reply for chat {chat_id!r}")
        if frame["type"] == "error":
            raise ServerError(str(frame.get("code")), str(frame.get("message")), detail=frame)
        return frame

    async def sync(self, chat_id: str, after_seq: int = 0, limit: int = 50,
                   timeout: float = 10.0) -> Frame:
        """One page of a chat's history over the socket: the ``sync`` reply
        (``messages`` in seq order after ``after_seq``, ``hasMore``). Raises
        :class:`ServerError` (``forbidden``, ``not_found``, …) when refused."""
        frame = await self._sync_page(chat_id, after_seq, limit, timeout)
        self.seqs.observe(frame)
        return frame

    def watch(self, chat_id: str, after_seq: int = 0) -> None:
        """Have catch-up cover ``chat_id`` with every seq up to ``after_seq`` counted as
        seen. A chat is watched anyway from the first frame of it this client hands out."""
        self.seqs.watch(chat_id, after_seq)

    async def catch_up(self, chat_ids: list[str] | None = None, *, page: int = SYNC_PAGE,
                       timeout: float = 10.0) -> dict[str, list[Frame]]:
        """For each chat (default: every tracked one), the history items (messages and
        command events) not seen yet, in seq order, each once; fetched with ``sync`` from
        the last seq seen, page by page. They then count as seen, and buffered frames that
        repeat a seen event are dropped from the inbox."""
        out: dict[str, list[Frame]] = {}
        for chat_id in self.seqs.chats() if chat_ids is None else chat_ids:
            missed: dict[int, Frame] = {}
            after = self.seqs.floor(chat_id)
            while True:
                reply = await self._sync_page(chat_id, after, page, timeout)
                items = [m for m in reply["messages"] if isinstance(m.get("seq"), int)]
                for item in items:
                    if not self.seqs.seen(chat_id, item["seq"]):
                        missed.setdefault(item["seq"], item)
                if not reply["hasMore"] or not items:
                    break
                after = items[-1]["seq"]
            self.seqs.watch(chat_id)
            for seq in missed:
                self.seqs.mark(chat_id, seq)
            self.inbox = [f for f in self.inbox
                          if not (f.get("chatId") == chat_id and self.seqs.is_seen(f))]
            out[chat_id] = [missed[s] for s in sorted(missed)]
        return out


def _token_now(token: TokenSource) -> str:
    return token() if callable(token) else token


async def _open(url: str, token: str, timeout: float, max_size: int
                ) -> tuple[ClientConnection, Frame]:
    sep = "&" if "?" in url else "?"
    try:
        ws = await connect(f"{url}{sep}access_token={quote(token, safe='')}", max_size=max_size,
                           open_timeout=timeout)
    except InvalidStatus as exc:
        status = exc.response.status_code
        raise HandshakeRefused(f"the server refused the WebSocket: HTTP {status}", status) from exc
    try:
        async with asyncio.timeout(timeout):
            raw = await ws.recv()
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        raise HandshakeRefused(f"the server closed the WebSocket ({code} {reason})".strip(),
                               code) from exc
    except TimeoutError:
        await ws.close()
        raise ReplyTimeout("'connected' frame", timeout) from None
    hello = orjson.loads(raw)
    if not (isinstance(hello, dict) and hello.get("type") == "system"
            and hello.get("event") == "connected"):
        await ws.close()
        raise ProtocolError(f"expected the 'connected' frame first, got {hello!r}")
    return ws, hello
