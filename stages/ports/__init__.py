"""Ports: what the domain needs from the outside world, and what each one guarantees.

Adapters in ``adapters/`` and ``cluster/`` implement these; stages receive them in a
typed :class:`Ports` object. Every port states its delivery semantics (ordering,
at-most/at-least once, what a repeat returns); the adapter tests check that text.
One module per area; everything is importable from ``stages.ports``.
"""

from stages.ports.analytics import Analytics, AnalyticsEvent, Outages
from stages.ports.attachments import (
    AttachmentRecord,
    AttachmentStore,
    ObjectInfo,
    ObjectStore,
    ScanLimitExceeded,
    UploadEndpoint,
    VirusScanner,
)
from stages.ports.bundle import (
    AttachmentLimits,
    MissingPort,
    NotificationLimits,
    Ports,
    SignalLimits,
    StageDefaults,
    need,
)
from stages.ports.chat import (
    COMMAND_KINDS,
    ChatDraft,
    ChatStore,
    Contacts,
    Directory,
    MessageStore,
    Outbox,
    Pointer,
    PointerMove,
    Receipt,
    Stored,
    StoredMessage,
    command_frame,
)
from stages.ports.delivery import (
    AckSink,
    ConnectionRegistry,
    Delivery,
    DeliveryHub,
    LocalDelivery,
    Notices,
)
from stages.ports.load import CreditBank, Debit, DedupWindow, RateGate

__all__ = [
    "COMMAND_KINDS",
    "AckSink",
    "Analytics",
    "AnalyticsEvent",
    "AttachmentLimits",
    "AttachmentRecord",
    "AttachmentStore",
    "ChatDraft",
    "ChatStore",
    "ConnectionRegistry",
    "Contacts",
    "CreditBank",
    "Debit",
    "DedupWindow",
    "Delivery",
    "DeliveryHub",
    "Directory",
    "LocalDelivery",
    "MessageStore",
    "MissingPort",
    "Notices",
    "NotificationLimits",
    "ObjectInfo",
    "ObjectStore",
    "Outages",
    "Outbox",
    "Pointer",
    "PointerMove",
    "Ports",
    "RateGate",
    "Receipt",
    "ScanLimitExceeded",
    "SignalLimits",
    "StageDefaults",
    "Stored",
    "StoredMessage",
    "UploadEndpoint",
    "VirusScanner",
    "command_frame",
    "need",
]
