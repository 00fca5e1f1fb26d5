"""The ``notification`` pipeline's stages: validate → persist → route."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from stages.model import Envelope, Outcome
from stages.notifications.acceptance import AcceptRequest
from stages.notifications.ports import DispatchKick, NotificationDraft, NotificationStore
from stages.notifications.validation import Limits, rfc3339_ms, validate_item
from stages.ports import Ports, need
from stages.resolver import StageRegistry


class ValidateNotification:
    """Per-item validation; valid items get their id, createdAt and normalised form."""

    name = "validate_notification"

    def __init__(self, id_factory: Callable[[], str] = lambda: str(uuid.uuid4()),
                 limits: Limits = Limits()) -> None:
        self.id_factory = id_factory
        self.limits = limits

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        out: list[Outcome] = []
        for env in batch:
            normalised, issues = validate_item(env.fields.get("notification"), self.limits)
            if normalised is None:
                env.meta["errors"] = issues
                out.append(Outcome.reject(env, "invalid", "; ".join(i["message"] for i in issues)))
                continue
            subject = env.meta.get("subject") or {"id": env.sender}
            # The Kafka ingress names the id (derived from its record id), so a record
            # read again after a crash is recognised as the same notification.
            notification_id = str(env.meta.get("notificationId") or self.id_factory())
            env.meta["notification"] = {
                "id": notification_id,
                "createdAt": rfc3339_ms(env.received_at),
                **normalised,
                "subject": subject,
            }
            out.append(Outcome.ok(env))
        return out


class PersistNotification:
    """Stores the batch's valid notifications with their outbox entries (one transaction)
    and, when the request carries an idempotency key (``meta["request"]``, an
    ``AcceptRequest``), the key's final response in that same transaction."""

    name = "persist_notification"

    def __init__(self, store: NotificationStore) -> None:
        self.store = store

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        drafts = []
        for env in batch:
            n = env.meta["notification"]
            drafts.append(NotificationDraft(
                id=n["id"], subject_id=n["subject"]["id"], subject_name=n["subject"].get("name"),
                contacts=n["contacts"], message=n["message"], is_immediate=n["isImmediate"],
                strategy=n["strategy"], created_at=env.received_at,
            ))
        if drafts:
            request = next((e.meta["request"] for e in batch
                            if isinstance(e.meta.get("request"), AcceptRequest)), None)
            record = request.record() if request is not None else None
            await self.store.accept(drafts, idempotency=record)
            if request is not None:
                request.persisted = True
        return [Outcome.ok(env) for env in batch]


class RouteNotification:
    """Immediate notifications are handed to the dispatcher now; the others wait for the
    next batch flush. Losing the hand-off loses nothing (the outbox has them)."""

    name = "route_notification"

    def __init__(self, dispatcher: DispatchKick | None) -> None:
        self.dispatcher = dispatcher

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        now = [e.meta["notification"]["id"] for e in batch if e.meta["notification"]["isImmediate"]]
        if now and self.dispatcher is not None:
            self.dispatcher.kick(now)
        for env in batch:
            env.meta["route"] = "immediate" if env.meta["notification"]["isImmediate"] else "queued"
        return [Outcome.done(env) for env in batch]


def register_notification_stages(reg: StageRegistry) -> None:
    def limits(o: Mapping[str, Any], p: Ports) -> Limits:
        d = p.defaults.notifications
        return Limits(int(o.get("max_contacts", d.max_contacts)),
                      int(o.get("max_message_chars", d.max_message_chars)))

    reg.register("validate_notification", lambda o, p: ValidateNotification(limits=limits(o, p)))
    reg.register("persist_notification", lambda o, p: PersistNotification(cast(
        NotificationStore, need(p.notification_store, "notification_store", "persist_notification"))))
    reg.register("route_notification", lambda o, p: RouteNotification(
        cast(DispatchKick | None, p.notification_dispatch)))
