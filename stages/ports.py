"""Ports: what the domain needs from the outside world, and what each one guarantees.

Adapters in ``adapters/`` and ``cluster/`` implement these; stages receive them as
arguments. Every port states its delivery semantics; the adapter tests check that text.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
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
      outbox entry, or none is. ``seq`` is per chat, gap-free and strictly increasing.
    - Idempotent on (sender_id, client_id): a draft seen before is not stored again; its
      Stored has ``duplicate=True`` and the original message id and seq.
    - Outbox entries stay until ``outbox_done`` removes them; ``claim_outbox`` hands
      entries older than a grace period to one caller at a time (at-least-once).
    """

    async def persist(self, drafts: Sequence[ChatDraft]) -> list[Stored]: ...

    async def outbox_done(self, outbox_ids: Sequence[int]) -> None: ...

    async def messages_after(
        self, chat_id: str, after_seq: int, limit: int
    ) -> list[StoredMessage]:
        """Messages of a chat with seq > after_seq, in seq order, at most ``limit``."""
        ...

    async def apply_receipts(self, receipts: Sequence[Receipt]) -> int:
        """Advance members' delivered/read pointers. Receipts are cumulative per chat:
        a receipt for seq N acknowledges every message up to N. Pointers never move back.
        Receipts for unknown messages or non-members are ignored. Returns rows updated."""
        ...


class DeliveryHub(Protocol):
    """Routes frames to the gateway replicas holding the recipients' sockets.

    At-most-once and best-effort: a frame for a user with no live connection is not
    kept. Durable types therefore rely on the store (replay on reconnect, redelivery)
    and use the hub only as the fast path.
    """

    async def publish(self, deliveries: Sequence[tuple[Sequence[str], dict[str, Any]]]) -> None:
        """Each item: (recipient user ids, frame)."""
        ...


class AckSink(Protocol):
    """Sends ``ack`` frames to senders. Best-effort: a sender gone is skipped."""

    async def acknowledge(self, batch: Sequence[Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class Debit:
    """The answer to one debit request."""

    granted: bool
    remaining: int
    retry_after: float  # seconds until enough credits are back (0 when granted)


class CreditBank(Protocol):
    """Per-user token buckets shared by every gateway replica.

    ``debit`` is atomic per request: a request is granted in full or not at all, in the
    order given. Buckets live in memory of sharded actors: if a shard is lost its users'
    buckets start full again (the bank errs towards letting people talk). When the bank
    cannot be reached the caller decides (the credits stage lets messages through).
    """

    async def debit(self, requests: Sequence[tuple[str, int]]) -> list[Debit]: ...


class DedupWindow(Protocol):
    """Short-lived memory of keys seen, for types that are never stored.

    ``first_seen`` marks every key and answers, per key, whether this was its first
    sighting within the window (``ttl_s``). Keys in one call are checked in order, so a key
    repeated in the same batch is a duplicate the second time. Losing a shard forgets its
    keys: a signal resent after that is forwarded again (at-least-once, never lost).
    """

    async def first_seen(self, keys: Sequence[str]) -> list[bool]: ...


class RateGate(Protocol):
    """Paces requests to an outside service that limits how often it may be called.

    ``acquire`` waits until one request for ``key`` (e.g. a Bitrix24 portal) may go; the
    caller sends right after it returns, one ``acquire`` per request. The gate holds its
    ``rate`` (requests per second) and ``burst`` (requests that may go at once after a quiet
    spell): over any window of ``w`` seconds at most ``burst + rate * w`` requests for a
    key pass. A process-local gate holds that per process; a shared gate holds it for every
    process using it (cluster-wide). If the shared state cannot be reached, a shared gate
    falls back to the process-local limit and logs it: the service goes on sending (the
    limit may then be exceeded N-fold for N processes, and the outside service's refusals
    are retried as transient failures) rather than stopping. Losing the shared state
    forgets past requests: at most one extra ``burst`` passes.
    """

    async def acquire(self, key: str) -> None: ...


class Notices(Protocol):
    """Server-generated ``system`` frames to a sender's connection: no ack, never stored,
    best-effort (a connection gone is skipped)."""

    def notify(self, connection: str | None, event: str, data: Mapping[str, Any]) -> None: ...


class Contacts(Protocol):
    """Who should hear about a user's presence: everyone sharing a chat with them."""

    async def contacts(self, user_ids: Sequence[str]) -> Mapping[str, frozenset[str]]: ...


@dataclass(frozen=True, slots=True)
class AnalyticsEvent:
    kind: str  # accepted | delivered | read
    message_id: str
    user_id: str  # the sender (accepted) or the receiver (delivered, read)
    type: str  # message type
    latency_s: float | None  # accepted: since the gateway received it; else since stored


class Analytics(Protocol):
    """Monitoring and analytics events. Fire-and-forget, at-most-once: an adapter may
    sample, aggregate or lose events, and must never slow the pipeline down."""

    def emit(self, events: Sequence[AnalyticsEvent]) -> None: ...


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    size: int
    content_type: str | None


class ObjectStore(Protocol):
    """S3-compatible object storage for attachments.

    ``upload_url`` returns a URL the client PUTs the bytes to directly (valid ``expires_s``);
    the store itself never proxies uploads. ``stat`` is None for a missing object. ``head``
    reads at most ``n`` first bytes; ``chunks`` streams a whole object in pieces of at most
    ``chunk_size`` bytes. ``copy`` makes ``dst`` a snapshot of ``src`` (data and content
    type, atomically: a concurrent overwrite of ``src`` is either wholly in the copy or not
    at all) and returns False when ``src`` does not exist. ``download_url`` serves the
    object as a download (``Content-Disposition: attachment`` with ``file_name``).
    ``delete`` is idempotent.
    """

    async def upload_url(self, key: str, content_type: str, size: int, expires_s: int) -> str: ...

    async def download_url(self, key: str, expires_s: int, file_name: str | None = None) -> str: ...

    async def stat(self, key: str) -> ObjectInfo | None: ...

    async def head(self, key: str, n: int) -> bytes: ...

    def chunks(self, key: str, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]: ...

    async def copy(self, src: str, dst: str) -> bool: ...

    async def delete(self, key: str) -> None: ...


class ScanLimitExceeded(Exception):
    """The virus scanner refused the stream as larger than it is configured to scan."""


class VirusScanner(Protocol):
    """A virus scanner (ClamAV's clamd). ``scan`` reads the whole stream and returns None
    when it is clean, else the signature found; it raises ``ScanLimitExceeded`` when the
    stream is over the scanner's size limit, and any other exception when the scan could
    not run (scanner unreachable, timeout): the file is then neither clean nor infected."""

    async def scan(self, chunks: AsyncIterable[bytes]) -> str | None: ...


@dataclass(frozen=True, slots=True)
class AttachmentRecord:
    id: str
    chat_id: str
    uploader: str
    client_id: str
    object_key: str
    file_name: str
    content_type: str
    size: int
    state: str  # pending | verifying | ready | rejected | expired | deleted
    upload_token: str
    expires_at: str
    message_id: str | None = None
    claim: str | None = None  # while verifying: the token of the processing that holds it


class AttachmentStore(Protocol):
    """Attachment records.

    - ``create`` is idempotent on (uploader, client id): a repeat returns the first record
      with ``duplicate`` True.
    - ``claim`` moves a ``pending`` record (or a ``verifying`` one whose claim is older than
      ``lease_s``: its processing died) to ``verifying`` under a fresh claim token, atomically:
      of two concurrent claims one gets the record, the other None. Only the holder of the
      claim may ``finish`` the record (to ``ready`` or ``rejected``) or ``release`` it back to
      ``pending``; both return False when the claim was lost. That is what makes repeated
      storage events harmless and keeps expiry from racing an upload being processed.
    - ``link`` records the chat message of a ready attachment.
    """

    async def create(self, records: Sequence[AttachmentRecord]
                     ) -> list[tuple[AttachmentRecord, bool]]: ...

    async def get(self, ids: Sequence[str]) -> dict[str, AttachmentRecord]: ...

    async def claim(self, attachment_id: str, lease_s: float) -> AttachmentRecord | None: ...

    async def release(self, attachment_id: str, claim: str) -> bool: ...

    async def finish(self, attachment_id: str, claim: str, state: str,
                     reason: str | None = None) -> bool: ...

    async def link(self, attachment_id: str, message_id: str) -> None: ...
