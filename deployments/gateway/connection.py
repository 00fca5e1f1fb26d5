"""One WebSocket connection: an ordered, gap-free writer with redelivery.

Delivery rules per (connection, chat):
- ``upto``: highest seq written to this socket in order; ``receipted``: highest seq the
  user acknowledged (cumulative). Both start at the member's stored pointer.
- A live frame with seq == upto + 1 is written; seq <= upto is skipped (already sent);
  a gap (or a frame we had to shed) triggers a catch-up read from the store, so the client
  always sees a chat's messages in seq order without holes.
- The sender's own message on the connection it came from is not echoed: the ack already
  told it the seq. It counts as received there, so the pointer moves past it.
- If receipts stall (upto > receipted) for longer than the backoff, everything after
  ``receipted`` is sent again (same message ids) and the backoff doubles.

Slow consumers. Behind Serve's proxy a socket write never waits for the client (the
frame is handed to the proxy at once), so how far a client has read is known only from
its receipts. A connection holds at most ``unreceipted_max`` written and not receipted
messages; past that its chats wait in the store (``held``) and are written as receipts
come. A connection held back for ``slow_consumer_s`` without a receipt moving anything
(from the first message held, so a burst after a quiet spell is not held against it), or
one with ``queue_size`` frames that cannot be read back from the store (acks, signals,
system frames...) queued and not written yet, gets a ``system`` ``slow_consumer`` frame
and is closed with 4408.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from starlette.websockets import WebSocket

from deployments.gateway.close_codes import SLOW_CONSUMER, reason
from stages.ports import ChatStore, MessageStore

log = logging.getLogger("conveyor.gateway")
CATCH_UP_PAGE = 200
UNREAD_TRACKED = 4096  # per connection, for read-latency analytics only


def _epoch(rfc3339: str | None) -> float:
    if not rfc3339:
        return time.time()
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def event_id(frame: dict[str, Any]) -> str:
    """The id a receipt names: a message's id, or a command event's ``eventId``."""
    return str(frame.get("eventId") or frame["messageId"])


@dataclass
class ChatState:
    upto: int
    receipted: int
    # event id -> (seq, stored at: epoch seconds), written here and not yet receipted
    sent: dict[str, tuple[int, float]] = field(default_factory=dict)
    own: dict[int, str] = field(default_factory=dict)  # own seq -> message id, past receipted
    progress_at: float = field(default_factory=time.monotonic)
    attempts: int = 0


class Connection:
    def __init__(
        self,
        ws: WebSocket,
        user_id: str,
        chats: ChatStore,
        messages: MessageStore,
        *,
        queue_size: int,
        implicit_receipt: Callable[[str, str], None],
        on_write: Callable[[str], None] | None = None,
        on_drop: Callable[[str, str], None] | None = None,
        on_hop: Callable[[str, float], None] | None = None,
        unreceipted_max: int = 256,
        slow_consumer_s: float = 30.0,
        on_slow: Callable[[str], None] | None = None,
    ) -> None:
        self.on_hop = on_hop  # ("deliver", seconds from commit to this socket)
        self.on_write = on_write
        self.on_drop = on_drop  # (frame type, reason): a frame this socket will never get
        self.ws = ws
        self.user_id = user_id
        self.id = str(uuid.uuid4())
        self.chats_store = chats
        self.messages = messages
        # One queue in order, bounded per kind: ``queue_size`` chat-stream items (beyond:
        # read back from the store later) and ``queue_size`` other frames (beyond: the
        # client is not keeping up). A burst of messages never crowds out an ack.
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.queue_size = queue_size
        self.queued = {"frame": 0, "stream": 0}
        self.chats: dict[str, ChatState] = {}
        # Store times of messages written here and not yet read, for read latency: a
        # "delivered" receipt retires ``ChatState.sent``, a "read" one may come much later.
        # Bounded (oldest forgotten first): it only feeds analytics.
        self.unread: OrderedDict[str, float] = OrderedDict()
        self.lagging: set[str] = set()
        self.implicit_receipt = implicit_receipt
        self.closed = False
        self.redelivered = 0
        # Types whose inbound buffer is full for this socket since the last ``overload``
        # frame: the client hears once per episode, not once per frame that waits.
        self.overloaded: set[str] = set()
        self._writer: asyncio.Task[None] | None = None
        # Slow consumers (module docstring): messages written and not receipted, chats
        # held back at the limit, and when a receipt last moved anything.
        self.unreceipted_max = unreceipted_max
        self.slow_consumer_s = slow_consumer_s
        self.on_slow = on_slow  # (reason): this connection is being closed as too slow
        self.in_flight = 0
        self.held: set[str] = set()
        self.held_since: float | None = None  # first message held since the last receipt
        self.slow: str | None = None  # why it was closed as a slow consumer
        self._closer: asyncio.Task[None] | None = None

    # --- called by the gateway --------------------------------------------------------
    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop())

    async def stop(self) -> None:
        self.closed = True
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
        if self._closer is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._closer

    def send(self, frame: dict[str, Any]) -> None:
        """Queue a frame that needs no ordering (ack, system, error, signal...). A full
        queue means the client is not keeping up: it is closed as a slow consumer."""
        if self.closed:
            return
        if self.queued["frame"] >= self.queue_size:
            if self.on_drop is not None:
                self.on_drop(str(frame.get("type")), "queue_full")
            self.too_slow(f"outbound queue full ({self.queue_size} frames)")
            return
        self.queued["frame"] += 1
        self.queue.put_nowait(("frame", frame))

    def too_slow(self, why: str) -> None:
        """Close this connection as a slow consumer: nothing more is queued or written
        but a ``system`` ``slow_consumer`` frame and the close (code 4408)."""
        if self.closed:
            return
        self.closed = True
        self.slow = why
        log.warning("connection %s of %s: slow consumer, closing: %s", self.id, self.user_id, why)
        if self.on_slow is not None:
            self.on_slow(why)
        if self._writer is not None:
            self._writer.cancel()
        self._closer = asyncio.get_running_loop().create_task(self._close_slow(why))

    async def _close_slow(self, why: str) -> None:
        if self._writer is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
        with contextlib.suppress(Exception):
            await self.ws.send_text(orjson.dumps(
                {"type": "system", "event": "slow_consumer",
                 "data": {"reason": why, "unreceipted": self.in_flight}}).decode())
            await self.ws.close(code=SLOW_CONSUMER, reason=reason(f"slow consumer: {why}"))

    def overload_started(self, type_name: str) -> bool:
        """The inbound buffer of ``type_name`` is full for a frame of this socket. True
        when this starts an overload episode: the client should be told."""
        if type_name in self.overloaded:
            return False
        self.overloaded.add(type_name)
        return True

    def overload_eased(self, type_name: str, depth: int, capacity: int) -> None:
        """A frame of ``type_name`` found room. The episode ends once the buffer is at most
        half full: a buffer hovering at its limit is one episode, not many."""
        if type_name in self.overloaded and depth <= capacity // 2:
            self.overloaded.discard(type_name)

    def deliver(self, frame: dict[str, Any], skip: str | None = None) -> None:
        """Queue a chat message (shared, never mutated); ``skip`` is the connection it
        was sent from. If the queue is full the message is read back from the store."""
        if self.closed:
            return
        if self.queued["stream"] >= self.queue_size:
            self.lagging.add(frame["chatId"])
            return
        self.queued["stream"] += 1
        self.queue.put_nowait(("message", (frame, skip)))

    def catch_up(self, chat_id: str) -> None:
        if self.queued["stream"] >= self.queue_size:
            self.lagging.add(chat_id)
            return
        self.queued["stream"] += 1
        self.queue.put_nowait(("catchup", chat_id))

    def init_chats(self, pointers: list[Any]) -> None:
        for p in pointers:
            self.chats[p.chat_id] = ChatState(p.delivered_seq, p.delivered_seq)
            if p.last_seq > p.delivered_seq:
                self.catch_up(p.chat_id)

    def resync(self, pointers: list[Any]) -> None:
        """Frames for this socket may have been lost upstream: re-read every chat from the
        store (already-sent seqs are skipped, so this only fills holes)."""
        for p in pointers:
            if p.chat_id not in self.chats:
                self.chats[p.chat_id] = ChatState(p.delivered_seq, p.delivered_seq)
            if p.last_seq > self.chats[p.chat_id].upto:
                self.catch_up(p.chat_id)

    def on_receipt(self, message_ids: list[str], status: str = "delivered") -> dict[str, float]:
        """Apply a receipt locally; returns stored-to-receipt latency per known id (for a
        ``read`` receipt, stored-to-read)."""
        now = time.time()
        latencies: dict[str, float] = {}
        if status == "read":
            for m in message_ids:
                stored_at = self.unread.pop(m, None)
                if stored_at is not None:
                    latencies[m] = now - stored_at
        for st in self.chats.values():
            if not st.sent:
                continue
            hits = [st.sent[m] for m in message_ids if m in st.sent]
            for m in message_ids:
                if m in st.sent:
                    latencies.setdefault(m, now - st.sent[m][1])
            best = max((seq for seq, _ in hits), default=None)
            if best is not None and best > st.receipted:
                self._advance(st, best)
                self.held_since = None
        if self.held and self.in_flight < self.unreceipted_max:
            for chat_id in list(self.held):
                self.held.discard(chat_id)
                self.catch_up(chat_id)
        return latencies

    def due_redelivery(self, now: float, base_s: float, max_s: float) -> list[str]:
        """Chats to write again from their receipted point (their backoff ran out). A
        connection held back for ``slow_consumer_s`` without a receipt is closed instead:
        writing again to a client that does not read only fills memory."""
        if self.closed:
            return []
        if self._stalled(now):
            return []
        due = []
        for chat_id, st in self.chats.items():
            if st.upto > st.receipted:
                wait = min(max_s, base_s * (2**st.attempts))
                if now - st.progress_at >= wait:
                    st.attempts += 1
                    st.progress_at = now
                    st.upto = st.receipted
                    self.in_flight -= len(st.sent)
                    st.sent.clear()
                    self.redelivered += 1
                    due.append(chat_id)
        if due and self.held:  # room again: held chats are read back too
            due.extend(c for c in self.held if c not in due)
            self.held.clear()
        return due

    # --- internals --------------------------------------------------------------------
    def _stalled(self, now: float) -> bool:
        """Held back for ``slow_consumer_s`` without a receipt: if so, closes the
        connection as a slow consumer."""
        if self.held_since is None or now - self.held_since < self.slow_consumer_s:
            return False
        self.too_slow(f"{self.unreceipted_max} messages not receipted in "
                      f"{now - self.held_since:.0f} s")
        return True

    def _room(self, chat_id: str) -> bool:
        """Whether one more message may be written now; if not, the chat is held until
        receipts make room (or the connection is closed as a slow consumer)."""
        if self.in_flight < self.unreceipted_max:
            return True
        self.held.add(chat_id)
        now = time.monotonic()
        if self.held_since is None:
            self.held_since = now
        self._stalled(now)
        return False

    def _advance(self, st: ChatState, seq: int) -> None:
        st.receipted = seq
        st.attempts = 0
        st.progress_at = time.monotonic()
        for m in [m for m, (s, _) in st.sent.items() if s <= seq]:
            del st.sent[m]
            self.in_flight -= 1
        # Own messages right after the receipted point count as received too.
        while st.receipted + 1 in st.own and st.receipted + 1 <= st.upto:
            st.receipted += 1
            self.implicit_receipt(self.user_id, st.own.pop(st.receipted))
        for s in [s for s in st.own if s <= st.receipted]:
            del st.own[s]

    async def _state(self, chat_id: str) -> ChatState:
        st = self.chats.get(chat_id)
        if st is None:
            pointers = await self.chats_store.pointers(self.user_id, chat_id)
            base = pointers[0].delivered_seq if pointers else 0
            st = self.chats.setdefault(chat_id, ChatState(base, base))
        return st

    async def _write(self, frame: dict[str, Any]) -> None:
        await self.ws.send_text(orjson.dumps(frame).decode())
        if self.on_write is not None:
            self.on_write(frame["type"])

    @property
    def unreceipted(self) -> int:
        return sum(st.upto - st.receipted for st in self.chats.values())

    async def _write_message(self, st: ChatState, frame: dict[str, Any]) -> None:
        if st.upto == st.receipted:
            st.progress_at = time.monotonic()
        await self._write(frame)
        st.upto = frame["seq"]
        if event_id(frame) not in st.sent:
            self.in_flight += 1
        st.sent[event_id(frame)] = (frame["seq"], _epoch(frame.get("createdAt")))
        self.unread[event_id(frame)] = st.sent[event_id(frame)][1]
        if len(self.unread) > UNREAD_TRACKED:
            self.unread.popitem(last=False)

    async def _on_message(self, frame: dict[str, Any], skip: str | None) -> None:
        chat_id = frame["chatId"]
        st = await self._state(chat_id)
        seq = frame["seq"]
        if seq <= st.upto:
            return
        if seq > st.upto + 1:
            # A held chat is read back from the store once receipts make room: reading
            # it for every message that arrives meanwhile would only load the store.
            if chat_id in self.held:
                self._stalled(time.monotonic())
            else:
                await self._catch_up(chat_id)
            return
        if skip == self.id:
            st.upto = seq
            if st.receipted == seq - 1:
                # The store moved this sender's pointer over its own message when it was
                # persisted (nothing of others in between): no receipt needed.
                st.receipted = seq
            else:
                st.own[seq] = event_id(frame)
            return
        if not self._room(chat_id):
            return
        await self._write_message(st, frame)
        if self.on_hop is not None:
            self.on_hop("deliver", time.time() - st.sent[event_id(frame)][1])

    async def _catch_up(self, chat_id: str) -> None:
        st = await self._state(chat_id)
        while not self.closed and self._room(chat_id):
            page = await self.messages.messages_after(chat_id, st.upto, CATCH_UP_PAGE)
            for m in page:
                if m.seq == st.upto + 1:
                    if not self._room(chat_id):
                        return
                    await self._write_message(st, m.frame())
            if len(page) < CATCH_UP_PAGE:
                return

    async def _write_loop(self) -> None:
        while not self.closed:
            kind, item = await self.queue.get()
            self.queued["frame" if kind == "frame" else "stream"] -= 1
            try:
                if kind == "frame":
                    await self._write(item)
                elif kind == "message":
                    await self._on_message(*item)
                else:
                    await self._catch_up(item)
                while self.lagging and self.queue.empty():
                    await self._catch_up(self.lagging.pop())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken socket ends the loop; the reader sees it
                if not self.closed:
                    log.info("connection %s: write failed: %r", self.id, exc)
                self.closed = True
                return


async def guarded(coro: Awaitable[Any], what: str) -> Any:
    try:
        return await coro
    except Exception:
        log.exception("%s failed", what)
        return None
