"""``Ports``: everything a stage may be built with, typed, in one object.

The composition root fills in what a process has (a stage host has no ``acks``; the
gateway has); a stage factory asks for what it needs with :func:`need`, which names the
stage and the missing port when a pipeline puts a stage where its port is absent.
``defaults`` are the operator's limits that stage options may override.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

from stages.ports.analytics import Analytics, Outages
from stages.ports.attachments import AttachmentStore, ObjectStore, VirusScanner
from stages.ports.chat import Contacts, Directory, MessageStore, Outbox
from stages.ports.delivery import AckSink, DeliveryHub, LocalDelivery, Notices
from stages.ports.load import CreditBank, DedupWindow

if TYPE_CHECKING:  # stages.bus imports this package: only for the annotation
    from stages.bus import ChatCache

T = TypeVar("T")


class MissingPort(LookupError):
    """A stage was placed in a process that lacks a port it needs."""


@dataclass(frozen=True)
class AttachmentLimits:
    max_bytes: int = 50 * 1024 * 1024
    content_types: tuple[str, ...] = ("image/png", "image/jpeg", "application/pdf")
    upload_ttl_s: int = 900
    claim_lease_s: float = 300.0


@dataclass(frozen=True)
class NotificationLimits:
    max_contacts: int = 20
    max_message_chars: int = 10_000


@dataclass(frozen=True)
class SignalLimits:
    """Who a ``signal`` may go to: ``contacts`` (a user sharing a chat with the sender,
    or the sender's own user id) or ``anyone``."""

    scope: str = "contacts"


@dataclass(frozen=True)
class StageDefaults:
    """Limits from the operator's settings; a stage's options in pipelines.yaml win."""

    attachments: AttachmentLimits = field(default_factory=AttachmentLimits)
    notifications: NotificationLimits = field(default_factory=NotificationLimits)
    signals: SignalLimits = field(default_factory=SignalLimits)


@dataclass(frozen=True)
class Ports:
    store: MessageStore | None = None
    outbox: Outbox | None = None
    directory: Directory | None = None
    contacts: Contacts | None = None
    hub: DeliveryHub | None = None
    credits: CreditBank | None = None
    dedup: DedupWindow | None = None
    objects: ObjectStore | None = None
    attachments: AttachmentStore | None = None
    scanner: VirusScanner | None = None
    acks: AckSink | None = None
    local_delivery: LocalDelivery | None = None
    notices: Notices | None = None
    analytics: Analytics | None = None
    outages: Outages | None = None
    cache: ChatCache | None = None  # the chat cache (Redis); None: no cache configured
    # The notification service's ports (typed in stages.notifications.ports; kept as
    # ``object`` here so this module does not depend on that package).
    notification_store: object | None = None
    notification_dispatch: object | None = None
    defaults: StageDefaults = field(default_factory=StageDefaults)

    def with_(self, **more: object) -> Ports:
        """A copy with some ports added or replaced (a process adds its local ones)."""
        return replace(self, **more)  # type: ignore[arg-type]


def need(port: T | None, name: str, stage: str) -> T:
    """``port``, or a ``MissingPort`` error naming the stage and the port."""
    if port is None:
        raise MissingPort(f"stage {stage!r} needs port {name!r}, which this process lacks")
    return port
