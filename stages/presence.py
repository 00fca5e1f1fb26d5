"""Presence changes fanned out to everyone sharing a chat with the user (droppable)."""

from __future__ import annotations

from collections.abc import Sequence

from stages.model import Envelope, Outcome
from stages.ports import Contacts, Delivery, DeliveryHub


class FanoutPresence:
    """``fields``: ``online`` (bool) and ``lastSeen`` (RFC 3339 or None). One ``system``
    ``presence`` frame per change to each contact's live connections: the users sharing a
    chat with the user (``Contacts``, the same notion that allows a signal or a presence
    lookup), whatever the scope settings; nobody else hears of it."""

    name = "fanout_presence"

    def __init__(self, contacts: Contacts, hub: DeliveryHub) -> None:
        self.contacts = contacts
        self.hub = hub

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        who = await self.contacts.contacts(sorted({e.sender for e in batch}))
        deliveries: list[Delivery] = []
        for env in batch:
            audience = sorted(who.get(env.sender, frozenset()) - {env.sender})
            if audience:
                deliveries.append(Delivery(audience, {
                    "type": "system", "event": "presence",
                    "data": {"userId": env.sender, "online": bool(env.fields.get("online")),
                             "lastSeen": env.fields.get("lastSeen")},
                }))
        if deliveries:
            await self.hub.publish(deliveries)
        return [Outcome.done(e) for e in batch]
