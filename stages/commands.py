"""The command route: edit, react, delete — events in the chat's seq stream.

validate → persist (the event gets the next seq of the target's chat and its effect is
applied to the target in the same transaction) → ack → deliver (the same at-least-once path
as chat messages: pointers, redelivery, replay).
"""

from __future__ import annotations

from collections.abc import Sequence

from stages.chat import MAX_ID_CHARS
from stages.model import Envelope, Outcome
from stages.ports import ChatDraft, Directory, MessageStore, command_frame

OPS = ("edit", "react", "delete")
MAX_EMOJI_CHARS = 32


class ValidateCommand:
    name = "validate_command"

    def __init__(self, max_body_chars: int = 4000) -> None:
        self.max_body_chars = max_body_chars

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        out = []
        for env in batch:
            f = env.fields
            op, target = f.get("op"), f.get("messageId")
            if op not in OPS:
                out.append(Outcome.reject(env, "invalid", "'op' must be edit, react or delete"))
            elif not isinstance(target, str) or not 0 < len(target) <= MAX_ID_CHARS:
                out.append(Outcome.reject(env, "invalid", "'messageId' must be a message id"))
            elif op == "edit" and (not isinstance(f.get("body"), str) or not f["body"]
                                   or len(f["body"]) > self.max_body_chars):
                out.append(Outcome.reject(
                    env, "invalid", f"'body' must be 1..{self.max_body_chars} characters"))
            elif op == "react" and (not isinstance(f.get("emoji"), str) or not f["emoji"]
                                    or len(f["emoji"]) > MAX_EMOJI_CHARS):
                out.append(Outcome.reject(
                    env, "invalid", f"'emoji' must be 1..{MAX_EMOJI_CHARS} characters"))
            else:
                out.append(Outcome.ok(env))
        return out


class PersistCommand:
    """Stores each command as an event and applies it; the store refuses a missing target
    (``not_found``), a non-member, or an edit/delete by someone other than the author
    (``forbidden``)."""

    name = "persist_command"

    def __init__(self, store: MessageStore, directory: Directory) -> None:
        self.store = store
        self.directory = directory

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        drafts = [
            ChatDraft(chat_id="", sender_id=e.sender, client_id=e.id,
                      body=e.fields.get("body") if e.fields["op"] == "edit" else None,
                      kind=e.fields["op"], target=e.fields["messageId"],
                      emoji=e.fields.get("emoji") if e.fields["op"] == "react" else None)
            for e in batch
        ]
        stored = await self.store.persist(drafts)
        chats = sorted({s.chat_id for s in stored if s.error is None})
        members = await self.directory.members(chats) if chats else {}
        out: list[Outcome] = []
        for env, s in zip(batch, stored, strict=True):
            if s.error is not None:
                message = {"not_found": "no such message",
                           "forbidden": "not allowed on this message"}.get(s.error, s.error)
                out.append(Outcome.reject(env, s.error, message))
                continue
            env.meta.update(
                messageId=s.message_id, chatId=s.chat_id, seq=s.seq, createdAt=s.created_at,
                duplicate=s.duplicate, outboxId=s.outbox_id, commandData=s.data,
                members=sorted(members.get(s.chat_id, ())),
                ack={"targetMessageId": env.fields["messageId"]},
                frame=command_frame(env.fields["op"], s.message_id, env.fields["messageId"],
                                    s.chat_id, s.seq, env.sender, s.created_at,
                                    env.fields.get("body"), s.data),
            )
            out.append(Outcome.ok(env))
        return out
