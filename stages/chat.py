"""Stages of the chat route: validate → persist (outbox) → ack → deliver; receipts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from stages.model import Envelope, Outcome
from stages.ports import (
    AckSink,
    ChatDraft,
    Delivery,
    DeliveryHub,
    Directory,
    LocalDelivery,
    MessageStore,
    Outages,
    Outbox,
    PointerMove,
    Receipt,
)

MAX_ID_CHARS = 128

log = logging.getLogger("conveyor.stages")


def _text(fields: Mapping[str, Any], key: str, *, max_chars: int, allow_empty: bool = False) -> str:
    value = fields.get(key)
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string")
    if not value and not allow_empty:
        raise ValueError(f"'{key}' must not be empty")
    if len(value) > max_chars:
        raise ValueError(f"'{key}' is longer than {max_chars} characters")
    return value


class ValidateChat:
    """Format and rights: a chatId the sender is a member of, a non-empty body."""

    name = "validate_chat"

    def __init__(self, directory: Directory, max_body_chars: int = 4000) -> None:
        self.directory = directory
        self.max_body_chars = max_body_chars

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        shaped: list[Outcome] = []
        for env in batch:
            try:
                _text(env.fields, "chatId", max_chars=MAX_ID_CHARS)
                _text(env.fields, "body", max_chars=self.max_body_chars)
            except ValueError as exc:
                shaped.append(Outcome.reject(env, "invalid", str(exc)))
                continue
            shaped.append(Outcome.ok(env))
        chat_ids = sorted({o.envelope.fields["chatId"] for o in shaped if not o.settled})
        members = await self.directory.members(chat_ids) if chat_ids else {}
        out: list[Outcome] = []
        for o in shaped:
            if o.settled:
                out.append(o)
                continue
            env = o.envelope
            chat = members.get(env.fields["chatId"])
            if chat is None:
                out.append(Outcome.reject(env, "not_found", "no such chat"))
            elif env.sender not in chat:
                out.append(Outcome.reject(env, "forbidden", "not a member of this chat"))
            else:
                env.meta["members"] = sorted(chat)
                out.append(Outcome.ok(env))
        return out


class PersistChat:
    """Stores the batch in one transaction with its outbox entries; marks duplicates."""

    name = "persist_chat"

    def __init__(self, store: MessageStore) -> None:
        self.store = store

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        drafts = [
            ChatDraft(
                chat_id=e.fields["chatId"],
                sender_id=e.sender,
                client_id=e.id,
                body=e.fields.get("body", ""),
                kind=e.meta.get("kind", "text"),
                attachment=e.meta.get("attachment"),
            )
            for e in batch
        ]
        stored = await self.store.persist(drafts)
        out: list[Outcome] = []
        for env, s in zip(batch, stored, strict=True):
            env.meta.update(
                messageId=s.message_id,
                chatId=s.chat_id,
                seq=s.seq,
                createdAt=s.created_at,
                duplicate=s.duplicate,
                outboxId=s.outbox_id,
            )
            out.append(Outcome.ok(env))
        return out


class Ack:
    """Tells each sender its message is accepted (or a duplicate). Marks the point in a
    pipeline after which the sender has been answered."""

    name = "ack"

    def __init__(self, acks: AckSink) -> None:
        self.acks = acks

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        await self.acks.acknowledge(batch)
        return [Outcome.ok(e) for e in batch]


def message_frame(env: Envelope) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "message",
        "messageId": env.meta["messageId"],
        "chatId": env.meta["chatId"],
        "seq": env.meta["seq"],
        "senderId": env.sender,
        "kind": env.meta.get("kind", "text"),
        "body": env.fields.get("body", ""),
        "createdAt": env.meta["createdAt"],
    }
    if env.meta.get("attachment") is not None:
        frame["attachment"] = env.meta["attachment"]
    return frame


def delivery_of(env: Envelope, local: bool = False) -> Delivery:
    """The frame of a stored message or command event, for every member; the sender's
    own connection (it already has its ack) is skipped. ``local``: the sender's gateway
    replica hands it to its own sockets (``deliver_local``), the hub to the others."""
    frame = dict(env.meta["frame"]) if "frame" in env.meta else message_frame(env)
    return Delivery(env.meta.get("members") or [env.sender], frame, skip=env.connection,
                    local=env.gateway if local else None)


class DeliverChat:
    """Hands new messages to the hub for every member's live connections, then clears
    their outbox entries. Members without a connection get them on reconnect; a crash
    before ``Outbox.done`` leaves the entries for the relay (at-least-once). With
    ``local``, the hub leaves the sender's gateway replica out: ``deliver_local`` there
    writes to its sockets without a round trip through the hub.

    With ``detached``, the hub call and ``Outbox.done`` run after the stage returns, so the
    ack (which follows the commit, not the delivery) does not wait for them. Batches still
    reach the hub in the order they were stored (each call is submitted before the next
    batch's), and at most ``max_detached`` batches are on their way at once: beyond that a
    batch waits for its own delivery, which is the backpressure. What a crash loses on the
    way, the outbox relay delivers."""

    name = "deliver_chat"

    def __init__(self, hub: DeliveryHub, outbox: Outbox, local: bool = False,
                 outages: Outages | None = None, detached: bool = False,
                 max_detached: int = 64) -> None:
        self.hub = hub
        self.outbox = outbox
        self.local = local
        self.outages = outages
        self.detached = detached
        self.max_detached = max_detached
        self._on_the_way: set[asyncio.Task[None]] = set()

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        deliveries: list[Delivery] = []
        outbox_ids: set[int] = set()
        for env in batch:
            if env.meta.get("duplicate"):
                continue
            deliveries.append(delivery_of(env, self.local))
            if env.meta.get("outboxId") is not None:
                outbox_ids.add(int(env.meta["outboxId"]))
        if deliveries or outbox_ids:
            if self.detached and len(self._on_the_way) < self.max_detached:
                task = asyncio.create_task(self._deliver(deliveries, sorted(outbox_ids)))
                self._on_the_way.add(task)
                task.add_done_callback(self._on_the_way.discard)
            else:
                await self._deliver(deliveries, sorted(outbox_ids))
        # Not settled: stages after delivery (the ack) still run for these items.
        return [Outcome.ok(e) for e in batch]

    async def _deliver(self, deliveries: list[Delivery], outbox_ids: list[int]) -> None:
        try:
            if deliveries:
                await self.hub.publish(deliveries)
            if outbox_ids:
                await self.outbox.done(outbox_ids)
        except Exception as exc:
            # The messages are stored and their outbox entries kept: the relay delivers
            # them after its grace period. Failing here would make the caller retry the
            # whole batch, and its sender would hear "duplicate" for a first send.
            log.warning("delivery of %d messages left to the outbox relay: %r",
                        len(deliveries), exc)
            if self.outages is not None:
                self.outages.unavailable("hub", self.name, len(deliveries))


class DeliverLocal:
    """In the sender's gateway replica, after ``deliver_chat`` with ``local``: the same
    frames to the members' sockets on this replica (at-most-once, as the hub; what is
    missed is replayed from the store)."""

    name = "deliver_local"

    def __init__(self, sockets: LocalDelivery) -> None:
        self.sockets = sockets

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        self.sockets.deliver([delivery_of(e, local=True) for e in batch
                              if not e.meta.get("duplicate")])
        return [Outcome.ok(e) for e in batch]


class ApplyReceipts:
    """Receiver ACKs: move each member's delivered/read pointer forward (cumulative), then
    tell the chat's other members where the pointers now stand (a ``system`` ``receipt``
    frame, best-effort like every hub delivery: a client that missed it reads the same
    positions from ``GET /v1/chats``).

    With ``announce_s`` > 0 the frames are coalesced: moves within that window are merged
    per (chat, member), and one frame per member carries where the pointers stand at the
    window's end (pointers never move back, so the newest position is the whole news).
    """

    name = "apply_receipts"

    def __init__(self, store: MessageStore, hub: DeliveryHub | None = None,
                 directory: Directory | None = None, announce_s: float = 0.0) -> None:
        self.store = store
        self.hub = hub
        self.directory = directory
        self.announce_s = announce_s
        self._pending: dict[tuple[str, str], PointerMove] = {}
        self._flush: asyncio.Task[None] | None = None

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        receipts: list[Receipt] = []
        out: list[Outcome] = []
        for env in batch:
            ids = env.fields.get("messageIds")
            status = env.fields.get("status", "delivered")
            if (
                not isinstance(ids, list)
                or not ids
                or len(ids) > 1000
                or not all(isinstance(i, str) and 0 < len(i) <= MAX_ID_CHARS for i in ids)
            ):
                out.append(Outcome.reject(env, "invalid", "'messageIds' must be 1..1000 ids"))
                continue
            if status not in ("delivered", "read"):
                out.append(Outcome.reject(env, "invalid", "'status' must be delivered or read"))
                continue
            receipts.extend(Receipt(env.sender, i, status) for i in ids)
            out.append(Outcome.done(env))
        if receipts:
            moved = await self.store.apply_receipts(receipts)
            if moved and self.hub is not None and self.directory is not None:
                await self._moved(moved)
        return out

    async def _moved(self, moved: Sequence[PointerMove]) -> None:
        if self.announce_s <= 0:
            await self._announce(moved)
            return
        for m in moved:
            key = (m.chat_id, m.user_id)
            was = self._pending.get(key)
            self._pending[key] = m if was is None else PointerMove(
                m.chat_id, m.user_id, max(was.delivered_seq, m.delivered_seq),
                max(was.read_seq, m.read_seq))
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._announce_later())

    async def _announce_later(self) -> None:
        await asyncio.sleep(self.announce_s)
        moved, self._pending = list(self._pending.values()), {}
        try:
            await self._announce(moved)
        except Exception:  # best-effort, as documented: GET /v1/chats has the positions
            log.warning("receipt frames for %d pointer moves not announced", len(moved),
                        exc_info=True)

    async def _announce(self, moved: Sequence[PointerMove]) -> None:
        assert self.hub is not None and self.directory is not None
        members = await self.directory.members(sorted({m.chat_id for m in moved}))
        deliveries = [
            Delivery(sorted(members.get(m.chat_id, frozenset()) - {m.user_id}), {
                "type": "system", "event": "receipt",
                "data": {"chatId": m.chat_id, "userId": m.user_id,
                         "deliveredSeq": m.delivered_seq, "readSeq": m.read_seq}})
            for m in moved]
        await self.hub.publish([d for d in deliveries if d.users])
