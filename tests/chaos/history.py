"""The history of a chat run, and the checker of the protocol's guarantees over it.

:class:`History` holds every frame each client sent or received (``client.WsClient``'s
``on_frame`` observer feeds it through :meth:`History.attach`), which chats have which
members, and what the server holds once the run is over (each chat's stored history,
each member's receipt pointers, each attachment's final state). :func:`check` reads it
and returns a :class:`Verdict`: the figures of the run and every violated rule.

Chat bodies carry their client id as first word (:func:`body_for`), so a stored row can be
traced back to the frame that caused it even when its ``messageId`` was never acked.

The rules, from ``PROTOCOL.md`` ("Guarantees") and the README's extensions:

1. *Acked is stored once.* A ``chat`` acked ``accepted`` or ``duplicate`` is in its chat's
   stored history exactly once, with the ``messageId`` and ``seq`` of the ack; every ack of
   one client id names the same ``messageId`` and ``seq``; no two stored rows carry the same
   (sender, client id) — a copy under a second id is a duplicate no client can detect.
2. *Acked is delivered to every member.* Every member other than the sender received it,
   live (a ``message`` frame) or by catch-up (a ``sync`` reply), on some connection.
3. *Seq.* Each chat's stored seqs are 1, 2, … N without holes; a ``messageId`` is seen with
   one seq only and a seq with one ``messageId`` only, in acks, frames and storage alike;
   on one connection, the live ``message`` frames of a chat never skip a seq, except the
   receiver's own messages (not echoed to the connection that sent them).
4. *Nothing unacked is delivered.* The protocol lets a frame whose ack was lost (the
   connection dropped) be stored and delivered; the client resends it with the same id and
   gets ``duplicate``. So: whatever is delivered or stored must come from a ``chat`` frame
   its sender sent to that chat with that client id; it must carry the ``messageId`` the
   sender's acks named, if any; and a client id whose every attempt was answered with a
   refusal (a ``rejected`` ack or an ``error`` frame: nothing was stored) is never
   delivered or stored. A client id that a sender gave up on without any answer may be
   stored and delivered (its ack may have been lost); it then counts as accepted.
5. *Receipts never go backwards.* On one connection, the ``receipt`` system frames about
   one member of one chat never lower ``deliveredSeq`` or ``readSeq``; each member's final
   pointers are at least the highest ever announced, and at most the chat's last seq.
6. *Attachments settle.* Every attachment whose upload was completed ends ``ready`` or
   refused with a typed code (:data:`ATTACHMENT_REFUSALS`), never left claimed
   (``verifying``) or pending; ``attachment_rejected`` frames carry one of those codes. A
   ready one is in its chat as exactly one message, delivered to every other member; a
   refused one is not in the chat. An attachment message in a chat must be of an
   ``attachment`` frame acked to its sender in that chat (the rule-4 check of attachments).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from client import WsClient

Frame = dict[str, Any]
Direction = Literal["out", "in"]

ACKED = ("accepted", "duplicate")
ATTACHMENT_REFUSALS = frozenset(
    {"too_large", "size_mismatch", "type_mismatch", "infected", "too_large_to_scan"})
ATTACHMENT_READY = "ready"


def body_for(client_id: str, text: str = "") -> str:
    """A chat body that names the frame it came from (its client id, then ``text``)."""
    return f"{client_id} {text}".rstrip()


def tag_of(body: Any) -> str | None:
    """The client id a body made by :func:`body_for` names (None for anything else)."""
    if not isinstance(body, str) or not body:
        return None
    return body.split(" ", 1)[0]


@dataclass(frozen=True)
class Event:
    """One frame on one connection: ``conn`` counts a user's connections from 1."""

    at: float
    user: str
    conn: int
    direction: Direction
    frame: Frame


@dataclass
class History:
    """Everything a run's clients did and saw, plus what the server held at the end."""

    events: list[Event] = field(default_factory=list)
    members: dict[str, set[str]] = field(default_factory=dict)  # chat -> member user ids
    stored: dict[str, list[Frame]] = field(default_factory=dict)  # chat -> history items
    pointers: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    uploaded: set[str] = field(default_factory=set)  # attachment ids whose upload completed
    attachments: dict[str, str] = field(default_factory=dict)  # attachment id -> final state
    faults: list[tuple[float, str]] = field(default_factory=list)
    _conns: dict[str, int] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def record(self, user: str, direction: Direction, frame: Frame) -> None:
        """Append one frame; a ``connected`` frame opens the user's next connection."""
        if (direction == "in" and frame.get("type") == "system"
                and frame.get("event") == "connected"):
            self._conns[user] = self._conns.get(user, 0) + 1
        self.events.append(Event(self.clock(), user, self._conns.get(user, 0), direction, frame))

    def attach(self, user: str, client: WsClient) -> None:
        """Record every frame ``client`` sends and reads from now on (its current
        connection's ``connected`` frame included)."""
        self.record(user, "in", client.hello)
        client.on_frame = lambda direction, frame: self.record(
            user, "out" if direction == "out" else "in", frame)

    def fault(self, what: str) -> float:
        """Note that a fault is injected now; returns the time noted."""
        at = self.clock()
        self.faults.append((at, what))
        return at


# --- what the checker derives from the events ---------------------------------------------
@dataclass
class Send:
    """One client id of one sender, over all its attempts."""

    sender: str
    client_id: str
    chat: str
    first_at: float
    attempts: int = 0
    answers: list[str] = field(default_factory=list)  # status, or "error:<code>"
    acks: list[Frame] = field(default_factory=list)  # the accepted / duplicate acks
    acked_at: float | None = None

    @property
    def acked(self) -> bool:
        return bool(self.acks)

    @property
    def refused(self) -> bool:
        """Every attempt was answered, and each answer said nothing was stored."""
        return (not self.acks and len(self.answers) >= self.attempts > 0
                and all(a == "rejected" or a.startswith("error:") for a in self.answers))


@dataclass(frozen=True)
class Delivery:
    user: str
    conn: int
    chat: str
    message_id: str
    seq: int
    sender: str
    tag: str | None
    live: bool  # a message frame (False: an item of a sync reply)
    attachment_id: str | None = None  # an attachment message's attachment


@dataclass
class Verdict:
    """The figures of a run and the rules it broke (empty ``violations``: none)."""

    offered: int = 0
    accepted: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    refused: int = 0
    unsettled: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def row(self, **extra: Any) -> dict[str, Any]:
        """The one-line result (figures, number of violations, and ``extra``)."""
        return {"offered": self.offered, "accepted": self.accepted, "delivered": self.delivered,
                "lost": self.lost, "duplicates": self.duplicates, "refused": self.refused,
                "unsettled": self.unsettled, "violations": len(self.violations), **extra}


def _sends(h: History) -> dict[tuple[str, str], Send]:
    sends: dict[tuple[str, str], Send] = {}
    for e in h.events:
        f = e.frame
        if e.direction == "out" and f.get("type") == "chat" and isinstance(f.get("id"), str):
            s = sends.setdefault((e.user, f["id"]), Send(e.user, f["id"], str(f.get("chatId")), e.at))
            s.attempts += 1
        elif e.direction == "in" and f.get("type") in ("ack", "error") and (e.user, f.get("id")) in sends:
            s = sends[(e.user, f["id"])]
            if f["type"] == "error":
                s.answers.append(f"error:{f.get('code')}")
            else:
                s.answers.append(str(f.get("status")))
                if f.get("status") in ACKED:
                    s.acks.append(f)
                    s.acked_at = e.at if s.acked_at is None else s.acked_at
    return sends


def _deliveries(h: History) -> Iterator[Delivery]:
    for e in h.events:
        f = e.frame
        if e.direction != "in":
            continue
        if f.get("type") == "message":
            items, live = [f], True
        elif f.get("type") == "sync":
            items = [m for m in f.get("messages") or () if m.get("type", "message") == "message"]
            live = False
        else:
            continue
        for m in items:
            yield Delivery(e.user, e.conn, str(m.get("chatId", f.get("chatId"))),
                           str(m.get("messageId")), int(m.get("seq", -1)), str(m.get("senderId")),
                           tag_of(m.get("body")), live, attachment_of(m))


def attachment_of(m: Frame) -> str | None:
    """The attachment id of an attachment message (None for a text message)."""
    if m.get("kind") != "attachment":
        return None
    return str((m.get("attachment") or {}).get("attachmentId"))


def _announced(h: History) -> dict[str, tuple[str, str]]:
    """Attachment id -> (uploader, chat) for every ``attachment`` frame acked accepted or
    duplicate."""
    frames = {(e.user, e.frame.get("id")): str(e.frame.get("chatId")) for e in h.events
              if e.direction == "out" and e.frame.get("type") == "attachment"}
    out: dict[str, tuple[str, str]] = {}
    for e in h.events:
        f = e.frame
        chat = frames.get((e.user, f.get("id")))
        if (e.direction == "in" and f.get("type") == "ack" and chat is not None
                and f.get("status") in ACKED and f.get("attachmentId")):
            out[str(f["attachmentId"])] = (e.user, chat)
    return out


def _stored_messages(h: History) -> Iterator[tuple[str, Frame]]:
    for chat, items in h.stored.items():
        for m in items:
            if m.get("type", "message") == "message":
                yield chat, m


def check(h: History) -> Verdict:
    """Every rule of the module's docstring over ``h``; see :class:`Verdict`."""
    v = Verdict()
    sends = _sends(h)
    deliveries = list(_deliveries(h))
    by_tag: dict[tuple[str, str], list[Frame]] = defaultdict(list)  # (sender, client id) -> rows
    for _, m in _stored_messages(h):
        tag = tag_of(m.get("body"))
        if tag is not None and attachment_of(m) is None:
            by_tag[(str(m.get("senderId")), tag)].append(m)
    _rule_acked_stored_once(h, sends, by_tag, v)
    lost = _rule_acked_delivered(h, sends, by_tag, deliveries, v)
    _rule_seq(h, sends, deliveries, v)
    _rule_nothing_unacked(h, sends, deliveries, v)
    _rule_receipts(h, v)
    _rule_attachments(h, deliveries, v)

    v.offered = len(sends)
    stored_tags = set(by_tag)
    accepted = {k for k, s in sends.items() if s.acked or k in stored_tags}
    v.accepted = len(accepted)
    v.refused = sum(1 for s in sends.values() if s.refused)
    v.unsettled = sum(1 for k, s in sends.items() if k not in accepted and not s.refused)
    v.lost += len(lost | {k for k, s in sends.items() if s.acked and k not in stored_tags})
    v.delivered = v.accepted - len(lost & accepted)
    return v


def _rule_acked_stored_once(h: History, sends: dict[tuple[str, str], Send],
                            by_tag: dict[tuple[str, str], list[Frame]], v: Verdict) -> None:
    stored_ids: dict[str, list[Frame]] = defaultdict(list)
    for chat, m in _stored_messages(h):
        stored_ids[str(m.get("messageId"))].append({**m, "chatId": m.get("chatId", chat)})
    for key, s in sends.items():
        rows = by_tag.get(key, [])
        if len({r.get("messageId") for r in rows}) > 1:
            v.duplicates += len(rows) - 1
            v.violations.append(f"rule 1: {s.sender}'s {s.client_id} is stored under "
                                f"{len(rows)} ids {sorted(str(r.get('messageId')) for r in rows)}")
        if not s.acked:
            continue
        named = {(a.get("messageId"), a.get("seq"), a.get("chatId", s.chat)) for a in s.acks}
        if len(named) > 1:
            v.duplicates += 1
            v.violations.append(f"rule 1: {s.sender}'s {s.client_id} acked under two ids: "
                                f"{sorted(map(str, named))}")
        mid, seq, chat = next(iter(named))
        found = stored_ids.get(str(mid), [])
        if len(found) != 1:
            v.violations.append(f"rule 1: acked message {mid} ({s.sender}'s {s.client_id}) "
                                f"is stored {len(found)} times")
        elif found[0].get("seq") != seq or found[0].get("chatId") != chat:
            v.violations.append(f"rule 1: acked message {mid} was acked as seq {seq} of {chat}, "
                                f"stored as seq {found[0].get('seq')} of {found[0].get('chatId')}")


def _rule_acked_delivered(h: History, sends: dict[tuple[str, str], Send],
                          by_tag: dict[tuple[str, str], list[Frame]], deliveries: list[Delivery],
                          v: Verdict) -> set[tuple[str, str]]:
    """Rule 2, for acked messages and for stored ones whose ack was lost (the server
    delivers what it stored whether or not the ack arrived)."""
    got: dict[str, set[str]] = defaultdict(set)  # message id -> users it reached
    for d in deliveries:
        got[d.message_id].add(d.user)
    lost: set[tuple[str, str]] = set()
    for key, s in sends.items():
        if s.acked:
            mid = str(s.acks[0].get("messageId"))
        elif by_tag.get(key):
            mid = str(by_tag[key][0].get("messageId"))
        else:
            continue
        missing = sorted(h.members.get(s.chat, set()) - {s.sender} - got[mid])
        if missing:
            lost.add(key)
            v.violations.append(f"rule 2: acked message {mid} ({s.sender}'s {s.client_id}) "
                                f"never reached {missing}")
    return lost


def _rule_seq(h: History, sends: dict[tuple[str, str], Send], deliveries: list[Delivery],
              v: Verdict) -> None:
    for chat, items in h.stored.items():
        seqs = [m.get("seq") for m in items]
        if seqs != list(range(1, len(seqs) + 1)):
            v.violations.append(f"rule 3: chat {chat} stores seqs {_span(seqs)}, not 1..{len(seqs)}")
    seq_of: dict[str, set[Any]] = defaultdict(set)
    id_of: dict[tuple[str, Any], set[str]] = defaultdict(set)
    seen: list[tuple[str, Any, Any]] = [(str(a.get("messageId")), a.get("chatId", s.chat), a.get("seq"))
            for s in sends.values() for a in s.acks]
    seen += [(d.message_id, d.chat, d.seq) for d in deliveries]
    seen += [(str(m.get("messageId")), chat, m.get("seq")) for chat, m in _stored_messages(h)]
    for mid, chat, seq in seen:
        seq_of[mid].add(seq)
        id_of[(chat, seq)].add(mid)
    for mid, seqs_seen in seq_of.items():
        if len(seqs_seen) > 1:
            v.violations.append(f"rule 3: message {mid} seen with seqs {sorted(map(str, seqs_seen))}")
    for (chat, seq), mids in id_of.items():
        if len(mids) > 1:
            v.violations.append(f"rule 3: seq {seq} of chat {chat} seen as {sorted(mids)}")
    own: dict[tuple[str, str], set[int]] = defaultdict(set)  # (user, chat) -> seqs of own messages
    for chat, m in _stored_messages(h):
        own[(str(m.get("senderId")), chat)].add(int(m.get("seq", -1)))
    top: dict[tuple[str, int, str], int] = {}
    for d in deliveries:
        if not d.live:
            continue
        key = (d.user, d.conn, d.chat)
        prev = top.get(key)
        if prev is not None and d.seq > prev + 1:
            skipped = set(range(prev + 1, d.seq)) - own[(d.user, d.chat)]
            if skipped:
                v.violations.append(f"rule 3: {d.user}'s connection {d.conn} got seq {d.seq} of "
                                    f"chat {d.chat} after {prev}, skipping {_span(sorted(skipped))}")
        top[key] = d.seq if prev is None else max(prev, d.seq)


def _rule_nothing_unacked(h: History, sends: dict[tuple[str, str], Send],
                          deliveries: list[Delivery], v: Verdict) -> None:
    seen: set[tuple[str, str, str]] = set()
    announced = _announced(h)
    observed = [(d.sender, d.tag, d.chat, d.message_id, d.attachment_id, f"delivered to {d.user}")
                for d in deliveries]
    observed += [(str(m.get("senderId")), tag_of(m.get("body")), chat, str(m.get("messageId")),
                  attachment_of(m), "stored") for chat, m in _stored_messages(h)]
    for sender, tag, chat, mid, aid, how in observed:
        if (mid, how, chat) in seen:
            continue
        seen.add((mid, how, chat))
        if aid is not None:
            if announced.get(aid) != (sender, chat):
                v.violations.append(f"rule 4: attachment message {mid} {how} (attachment {aid}, "
                                    f"sender {sender}, chat {chat}) was never acked to its sender")
            continue
        s = sends.get((sender, tag)) if tag is not None else None
        if s is None or s.chat != chat:
            v.violations.append(f"rule 4: message {mid} {how} (sender {sender}, tag {tag!r}, "
                                f"chat {chat}) was never sent to that chat")
        elif s.refused:
            v.violations.append(f"rule 4: message {mid} {how} but every attempt of "
                                f"{sender}'s {tag} was refused ({s.answers})")
        elif s.acked and str(s.acks[0].get("messageId")) != mid:
            v.duplicates += how == "stored"
            v.violations.append(f"rule 4: message {mid} {how} but {sender}'s {tag} was acked "
                                f"as {s.acks[0].get('messageId')}")


def _rule_receipts(h: History, v: Verdict) -> None:
    last: dict[tuple[str, int, str, str], tuple[int, int]] = {}
    highest: dict[tuple[str, str], tuple[int, int]] = {}
    for e in h.events:
        f = e.frame
        if e.direction != "in" or f.get("type") != "system" or f.get("event") != "receipt":
            continue
        d = f.get("data") or {}
        chat, who = str(d.get("chatId")), str(d.get("userId"))
        now = (int(d.get("deliveredSeq") or 0), int(d.get("readSeq") or 0))
        key = (e.user, e.conn, chat, who)
        before = last.get(key)
        if before is not None and (now[0] < before[0] or now[1] < before[1]):
            v.violations.append(f"rule 5: {e.user}'s connection {e.conn} saw {who}'s pointers "
                                f"in {chat} go from {before} back to {now}")
        last[key] = now if before is None else (max(before[0], now[0]), max(before[1], now[1]))
        hi = highest.get((chat, who), (0, 0))
        highest[(chat, who)] = (max(hi[0], now[0]), max(hi[1], now[1]))
    for (chat, who), final in h.pointers.items():
        hi = highest.get((chat, who), (0, 0))
        if final[0] < hi[0] or final[1] < hi[1]:
            v.violations.append(f"rule 5: {who}'s final pointers in {chat} {final} are below "
                                f"the announced {hi}")
        last_seq = max((int(m.get("seq", 0)) for m in h.stored.get(chat, ())), default=0)
        if chat in h.stored and max(final) > last_seq:
            v.violations.append(f"rule 5: {who}'s final pointers in {chat} {final} pass its "
                                f"last seq {last_seq}")


def _rule_attachments(h: History, deliveries: list[Delivery], v: Verdict) -> None:
    for e in h.events:
        f = e.frame
        if (e.direction == "in" and f.get("type") == "system"
                and f.get("event") == "attachment_rejected"
                and (f.get("data") or {}).get("code") not in ATTACHMENT_REFUSALS):
            v.violations.append(f"rule 6: attachment_rejected without a known code: {f}")
    stored: dict[str, list[Frame]] = defaultdict(list)
    for _, m in _stored_messages(h):
        aid = attachment_of(m)
        if aid is not None:
            stored[aid].append(m)
    got: dict[str, set[str]] = defaultdict(set)
    for d in deliveries:
        if d.attachment_id is not None:
            got[d.attachment_id].add(d.user)
    announced = _announced(h)
    for aid in sorted(set(stored) | h.uploaded):
        state = h.attachments.get(aid)
        rows = stored.get(aid, [])
        if aid in h.uploaded and state != ATTACHMENT_READY and state not in ATTACHMENT_REFUSALS:
            v.violations.append(f"rule 6: attachment {aid} ended {state!r}, neither ready nor "
                                "refused with a code")
        if len({r.get("messageId") for r in rows}) > 1:
            v.duplicates += len(rows) - 1
            v.violations.append(f"rule 6: attachment {aid} is stored as {len(rows)} messages")
        if state == ATTACHMENT_READY and not rows:
            v.lost += 1
            v.violations.append(f"rule 6: attachment {aid} is ready but its message is not stored")
        if state in ATTACHMENT_REFUSALS and rows:
            v.violations.append(f"rule 6: attachment {aid} was refused ({state}) but is in the chat")
        uploader, chat = announced.get(aid, ("", ""))
        missing = sorted(h.members.get(chat, set()) - {uploader} - got[aid]) if rows else []
        if missing:
            v.lost += 1
            v.violations.append(f"rule 6: attachment {aid}'s message never reached {missing}")


def recovery_s(h: History, fault_at: float) -> float | None:
    """Seconds from ``fault_at`` to the first ``accepted`` ack of a chat frame first sent
    after it (None: nothing sent after the fault was accepted)."""
    times = [s.acked_at for s in _sends(h).values()
             if s.first_at >= fault_at and s.acked_at is not None]
    return round(min(times) - fault_at, 3) if times else None


def _span(seqs: list[Any]) -> str:
    return str(seqs) if len(seqs) <= 12 else f"{seqs[:6]}…{seqs[-6:]} ({len(seqs)})"
