"""Chat storage: the values a store hands back, and the ports for messages, chats,
membership, contacts and the delivery outbox."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ChatDraft:
    """A chat message to persist: validated, not yet numbered."""

    chat_id: str
    sender_id: str
    client_id: str
    body: str | None
    kind: str = "text"  # text | attachment | edit | react | delete
    attachment: dict[str, Any] | None = None
    target: str | None = None  # commands: the message acted on (chat_id is then found from it)
    emoji: str | None = None  # react


COMMAND_KINDS = frozenset({"edit", "react", "delete"})


@dataclass(frozen=True, slots=True)
class Stored:
    """The result of persisting one ChatDraft. ``error`` (a PROTOCOL error code) means the
    draft was refused by the store (a command's target missing, not the author...)."""

    message_id: str
    chat_id: str
    seq: int
    created_at: str
    duplicate: bool
    outbox_id: int | None = None
    error: str | None = None
    data: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    message_id: str
    chat_id: str
    seq: int
    sender_id: str
    kind: str
    body: str | None
    created_at: str
    attachment: dict[str, Any] | None = None
    edited_at: str | None = None
    deleted: bool = False
    reactions: dict[str, int] = field(default_factory=dict)
    target: str | None = None
    data: dict[str, Any] | None = None

    def frame(self) -> dict[str, Any]:
        """The PROTOCOL.md frame for this row: ``message``, or ``command`` for events."""
        if self.kind in COMMAND_KINDS:
            return command_frame(self.kind, self.message_id, self.target or "", self.chat_id,
                                 self.seq, self.sender_id, self.created_at, self.body, self.data)
        out: dict[str, Any] = {
            "type": "message",
            "messageId": self.message_id,
            "chatId": self.chat_id,
            "seq": self.seq,
            "senderId": self.sender_id,
            "kind": self.kind,
            "body": None if self.deleted else self.body,
            "createdAt": self.created_at,
        }
        if self.attachment is not None:
            out["attachment"] = self.attachment
        if self.edited_at:
            out["editedAt"] = self.edited_at
        if self.deleted:
            out["deleted"] = True
        if self.reactions:
            out["reactions"] = self.reactions
        return out


def command_frame(op: str, event_id: str, target: str, chat_id: str, seq: int, by: str,
                  created_at: str, body: str | None, data: dict[str, Any] | None) -> dict[str, Any]:
    """The PROTOCOL.md ``command`` frame; ``eventId`` (an extension) is what receipts name."""
    out: dict[str, Any] = {"type": "command", "op": op, "messageId": target, "chatId": chat_id,
                           "seq": seq, "by": by, "eventId": event_id, "createdAt": created_at}
    if op == "edit":
        out["body"] = body
    if op == "react" and data:
        out["emoji"] = data.get("emoji")
        out["added"] = data.get("added")
    return out


@dataclass(frozen=True, slots=True)
class Receipt:
    user_id: str
    message_id: str
    status: str  # "delivered" | "read"


@dataclass(frozen=True, slots=True)
class Pointer:
    """A member's position in a chat: everything up to ``delivered_seq`` was received."""

    chat_id: str
    delivered_seq: int
    read_seq: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class PointerMove:
    """Where a member's pointers stand after a receipt moved at least one of them."""

    chat_id: str
    user_id: str
    delivered_seq: int
    read_seq: int


class Directory(Protocol):
    """Who belongs to which chat.

    Membership read here may be up to a cache interval old; the store's transaction is
    not consulted again, so a member removed a moment ago may still post once.
    """

    async def members(self, chat_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        """Members per known chat id; unknown chats are absent from the result."""
        ...


class MessageStore(Protocol):
    """Durable chat storage with an outbox.

    - ``persist`` is atomic per batch: every draft is stored, numbered and given an
      outbox entry (see ``Outbox``), or none is. ``seq`` is per chat, gap-free and
      strictly increasing; a later batch on the same chat sees every earlier commit.
    - Idempotent on (sender_id, client_id): a draft seen before is not stored again; its
      Stored has ``duplicate=True`` and the original message id and seq.
    """

    async def persist(self, drafts: Sequence[ChatDraft]) -> list[Stored]: ...

    async def messages_after(
        self, chat_id: str, after_seq: int, limit: int
    ) -> list[StoredMessage]:
        """Messages of a chat with seq > after_seq, in seq order, at most ``limit``:
        messages in their current state (edited body, tombstone, reaction counts) and
        command events. Reads committed data only; repeatable."""
        ...

    async def apply_receipts(self, receipts: Sequence[Receipt]) -> list[PointerMove]:
        """Advance members' delivered/read pointers. Receipts are cumulative per chat:
        a receipt for seq N acknowledges every message up to N. Pointers never move back,
        so a repeated or reordered receipt is harmless (it moves nothing). Receipts for
        unknown messages or non-members are ignored. Returns the pointers that moved, at
        their new positions, one per (chat, member)."""
        ...


class Outbox(Protocol):
    """The delivery outbox: one entry per (persisted batch, chat), written in the persist
    transaction. At-least-once: an entry stays until ``done`` removes it, so a delivery
    that never ran (a replica died between commit and hand-off) is found by ``claim``."""

    async def done(self, outbox_ids: Sequence[int]) -> None:
        """Remove entries whose messages were handed to delivery. Idempotent."""
        ...

    async def claim(self, grace_s: float, limit: int, lease_s: float = 30.0
                    ) -> list[tuple[int, list[StoredMessage]]]:
        """Entries older than ``grace_s``, oldest first, each with its messages in seq
        order, leased to this caller for ``lease_s`` (concurrent callers never get the
        same entry while the lease holds; after it, the entry is claimable again)."""
        ...

    async def stats(self) -> tuple[int, float]:
        """(entries pending, age in seconds of the oldest)."""
        ...


class ChatStore(Protocol):
    """Chats, their members and each member's position (delivered/read pointers)."""

    async def ping(self) -> None:
        """Raises when the store cannot be reached."""
        ...

    async def create_chat(self, creator: str, members: Sequence[str], title: str | None) -> str:
        """A new chat of ``creator`` and ``members`` (deduplicated); returns its id. Not
        idempotent: each call creates a chat."""
        ...

    async def chats_of(self, user_id: str) -> list[dict[str, Any]]:
        """The user's chats in creation order: ``chatId, title, members, lastSeq,
        deliveredSeq, readSeq, unreadCount`` (messages, not command events, after
        ``readSeq`` from others) and ``peers`` (each other member's ``userId,
        deliveredSeq, readSeq``: what the user's messages reached)."""
        ...

    async def members(self, chat_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        """Members per known chat, read now (no cache); unknown chats are absent."""
        ...

    async def pointers(self, user_id: str, chat_id: str | None = None) -> list[Pointer]:
        """The user's position in each of their chats (or in ``chat_id``), read now."""
        ...

    async def delivery_backlog(self) -> tuple[int, float]:
        """(messages stored and not yet receipted, summed over every member, online or
        not; age in seconds of the oldest). One aggregate read."""
        ...


class Contacts(Protocol):
    """Who is whose contact: two users are contacts when they are members of at least one
    chat together. The one notion of a contact: a user's presence changes go to their
    contacts, and (with the ``contacts`` scopes) signals and presence lookups are allowed
    between contacts only."""

    async def contacts(self, user_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        """Everyone sharing at least one chat with each user (the user among them); users
        in no chat are absent. Read now."""
        ...

    async def share_chat(self, pairs: Sequence[tuple[str, str]]) -> AbstractSet[tuple[str, str]]:
        """The pairs ``(a, b)`` of ``pairs`` whose users are members of one chat at least,
        as given (one indexed read for the lot). A pair found may be up to a cache interval
        old, as membership (``Directory``); a pair not found is read now, so a chat created
        a moment ago counts at once."""
        ...

