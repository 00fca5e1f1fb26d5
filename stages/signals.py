"""The signal route: never stored. validate (shape, and who may be signalled) → dedup
window → ack → forward."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import orjson

from stages.model import Envelope, Outcome
from stages.ports import Contacts, DedupWindow, Delivery, DeliveryHub, Outages

log = logging.getLogger("conveyor.signals")
MAX_USER_ID = 128


class ValidateSignal:
    """Format and rights: a recipient user id and an object payload under a size cap and,
    with ``contacts``, a recipient who is a contact of the sender (shares a chat with
    them) or the sender itself (its other devices; the forward reaches every connection of
    the user, the sending one too). A signal to anyone else is refused ``forbidden`` and
    never forwarded. The check is one ``Contacts.share_chat`` call per batch. Without
    ``contacts`` (the ``anyone`` scope) a signal may go to any user id."""

    name = "validate_signal"

    def __init__(self, max_payload_bytes: int = 16_384, contacts: Contacts | None = None) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.contacts = contacts

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        out = []
        for env in batch:
            to = env.fields.get("to")
            payload = env.fields.get("payload")
            if not isinstance(to, str) or not 0 < len(to) <= MAX_USER_ID:
                out.append(Outcome.reject(env, "invalid", "'to' must be a user id"))
            elif not isinstance(payload, dict):
                out.append(Outcome.reject(env, "invalid", "'payload' must be an object"))
            elif len(orjson.dumps(payload)) > self.max_payload_bytes:
                out.append(Outcome.reject(env, "invalid",
                                          f"'payload' exceeds {self.max_payload_bytes} bytes"))
            else:
                out.append(Outcome.ok(env))
        if self.contacts is not None:
            out = await self._to_contacts_only(out, self.contacts)
        return out

    @staticmethod
    async def _to_contacts_only(shaped: list[Outcome], contacts: Contacts) -> list[Outcome]:
        pairs = sorted({(o.envelope.sender, o.envelope.fields["to"]) for o in shaped
                        if not o.settled and o.envelope.fields["to"] != o.envelope.sender})
        allowed = await contacts.share_chat(pairs) if pairs else frozenset()
        out: list[Outcome] = []
        for o in shaped:
            env = o.envelope
            if (not o.settled and env.fields["to"] != env.sender
                    and (env.sender, env.fields["to"]) not in allowed):
                out.append(Outcome.reject(env, "forbidden",
                                          "the recipient shares no chat with the sender"))
            else:
                out.append(o)
        return out


class DedupSignal:
    """Marks a repeated (sender, id) within the window as a duplicate: acked, not forwarded.

    If the window (or a shard of it) cannot be reached, its signals count as first seen
    and are reported to ``outages``, as the credits stage does with the bank: a resent
    signal may then be forwarded twice, but losing the window never drops a signal."""

    name = "dedup_signal"

    def __init__(self, window: DedupWindow, outages: Outages | None = None) -> None:
        self.window = window
        self.outages = outages

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        answers: list[bool | None]
        try:
            answers = list(await self.window.first_seen([f"{e.sender}\x1f{e.id}" for e in batch]))
        except Exception as exc:
            log.warning("dedup window unreachable (%r): %d signals pass unchecked",
                        exc, len(batch))
            answers = [None] * len(batch)
        unchecked = sum(1 for a in answers if a is None)
        if unchecked and self.outages is not None:
            self.outages.unavailable("dedup", self.name, unchecked)
        for env, new in zip(batch, answers, strict=True):
            env.meta["duplicate"] = new is False
        return [Outcome.ok(e) for e in batch]


class ForwardSignal:
    """Hands signals to the hub for the recipient's live connections (at-most-once)."""

    name = "forward_signal"

    def __init__(self, hub: DeliveryHub) -> None:
        self.hub = hub

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        deliveries = [
            Delivery([e.fields["to"]], {"type": "signal", "id": e.id, "from": e.sender,
                                        "payload": e.fields["payload"]})
            for e in batch if not e.meta.get("duplicate")
        ]
        if deliveries:
            await self.hub.publish(deliveries)
        return [Outcome.done(e) for e in batch]
