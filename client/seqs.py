"""Which events of each chat a client has seen, by ``seq`` — what catch-up starts from.

Within a chat ``seq`` is gap-free and strictly increasing (``PROTOCOL.md``), and the
history (``GET /v1/chats/{id}/messages``, the ``sync`` frame) lists every seq: messages
and command events alike. So "seen" is kept as a *floor* (every seq up to it is seen)
plus the few seen seqs above it (a reply that arrived out of order, one's own message
acked before someone else's earlier one was delivered). Catch-up asks for everything
after the floor and keeps only what was not seen, so a gap is filled and nothing is
handed out twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Frames whose (chatId, seq) is an event of the chat the caller now knows about.
EVENT_TYPES = frozenset({"message", "command"})
STORED_ACKS = frozenset({"accepted", "duplicate"})


class SeqTracker:
    """Seen seqs per chat. A chat is tracked from :meth:`watch` or from the first frame
    that names it; tracking starts at seq 0 unless ``watch`` says otherwise."""

    def __init__(self) -> None:
        self._floor: dict[str, int] = {}
        self._above: dict[str, set[int]] = {}

    def watch(self, chat_id: str, after_seq: int = 0) -> None:
        """Track ``chat_id``, with every seq up to ``after_seq`` counted as seen (for
        instance a chat's ``deliveredSeq`` from ``GET /v1/chats``)."""
        floor = max(self._floor.get(chat_id, 0), after_seq)
        above = {s for s in self._above.get(chat_id, set()) if s > floor}
        self._floor[chat_id], self._above[chat_id] = floor, above
        self._advance(chat_id)

    def chats(self) -> list[str]:
        """The tracked chats, in the order they became known."""
        return list(self._floor)

    def floor(self, chat_id: str) -> int:
        """The highest seq such that it and every seq before it have been seen."""
        return self._floor.get(chat_id, 0)

    def highest(self, chat_id: str) -> int:
        """The highest seq seen in ``chat_id`` (0: none)."""
        return max(self._above.get(chat_id) or {self.floor(chat_id)})

    def snapshot(self) -> Mapping[str, int]:
        """The highest seq seen, per tracked chat."""
        return {c: self.highest(c) for c in self._floor}

    def seen(self, chat_id: str, seq: int) -> bool:
        return seq <= self._floor.get(chat_id, 0) or seq in self._above.get(chat_id, ())

    def mark(self, chat_id: str, seq: int) -> None:
        """Record that the caller has seen event ``seq`` of ``chat_id``."""
        if chat_id not in self._floor:
            self._floor[chat_id], self._above[chat_id] = 0, set()
        if seq > self._floor[chat_id]:
            self._above[chat_id].add(seq)
            self._advance(chat_id)

    def observe(self, frame: Mapping[str, Any]) -> None:
        """Record the events a server frame shows: a ``message`` or ``command``, the seq an
        ``ack`` gives one's own frame, every item of a ``sync``."""
        ftype, chat_id = frame.get("type"), frame.get("chatId")
        if not isinstance(chat_id, str):
            return
        if ftype == "sync":
            for item in frame.get("messages") or ():
                if isinstance(item, Mapping) and isinstance(item.get("seq"), int):
                    self.mark(chat_id, item["seq"])
        elif (ftype in EVENT_TYPES or (ftype == "ack" and frame.get("status") in STORED_ACKS)
              ) and isinstance(frame.get("seq"), int):
            self.mark(chat_id, frame["seq"])

    def is_seen(self, frame: Mapping[str, Any]) -> bool:
        """Whether ``frame`` is an event (``message``/``command``) already seen."""
        chat_id, seq = frame.get("chatId"), frame.get("seq")
        return (frame.get("type") in EVENT_TYPES and isinstance(chat_id, str)
                and isinstance(seq, int) and self.seen(chat_id, seq))

    def _advance(self, chat_id: str) -> None:
        floor, above = self._floor[chat_id], self._above[chat_id]
        while floor + 1 in above:
            floor += 1
            above.discard(floor)
        self._floor[chat_id] = floor
