"""The notification service's domain (seed 004): one module per concept.

- ``validation``: an item against the contract, errors as ``{code, message, path}``;
- ``acceptance``: the 202/207/400 answer to a POST, shared by the request's envelopes;
- ``ports``: the store, the dispatcher hand-off, channels, and their values;
- ``resilience``: circuit breakers and the retry policy;
- ``dispatch``: the strategy over contacts, one round at a time;
- ``pacing``: how fast the dispatcher's loops go (the feedback loop);
- ``stages``: the ``notification`` pipeline (validate → persist → route).

Pure domain code: no I/O. Everything is importable from ``stages.notifications``.
"""

from stages.notifications.acceptance import (
    AcceptRequest,
    acceptance,
)
from stages.notifications.dispatch import (
    SKIP_WAIT_MIN_S,
    Attempt,
    ContactProgress,
    ContactStatus,
    FinalState,
    Job,
    RoundResult,
    adopt_recorded,
    dispatch_round,
    final_state,
)
from stages.notifications.pacing import (
    DispatchPacer,
    RoundReport,
)
from stages.notifications.ports import (
    Channel,
    Delivery,
    DeliveryJournal,
    DispatchKick,
    DispatchQueue,
    IdempotencyClaim,
    IdempotencyLost,
    IdempotencyRecord,
    NotificationApiStore,
    NotificationDraft,
    NotificationStore,
    ResultCallback,
    SendResult,
    SendStatus,
    report_all,
)
from stages.notifications.resilience import (
    BreakerState,
    CircuitBreaker,
    GuardedChannel,
    RetryPolicy,
)
from stages.notifications.stages import (
    PersistNotification,
    RouteNotification,
    ValidateNotification,
    register_notification_stages,
)
from stages.notifications.validation import (
    CONTACT_KEYS,
    CONTACT_TYPES,
    DEFAULT_STRATEGY,
    EMAIL_PATTERN,
    EMAIL_RE,
    ITEM_KEYS,
    MAX_BITRIX_ID,
    MAX_CONTACTS,
    MAX_EMAIL_CHARS,
    MAX_ITEMS,
    MAX_MESSAGE_CHARS,
    STRATEGIES,
    Limits,
    issue,
    list_size_issues,
    rfc3339_ms,
    type_name,
    validate_item,
)

__all__ = [
    "CONTACT_KEYS",
    "CONTACT_TYPES",
    "DEFAULT_STRATEGY",
    "EMAIL_PATTERN",
    "EMAIL_RE",
    "ITEM_KEYS",
    "MAX_BITRIX_ID",
    "MAX_CONTACTS",
    "MAX_EMAIL_CHARS",
    "MAX_ITEMS",
    "MAX_MESSAGE_CHARS",
    "SKIP_WAIT_MIN_S",
    "STRATEGIES",
    "AcceptRequest",
    "Attempt",
    "BreakerState",
    "Channel",
    "CircuitBreaker",
    "ContactProgress",
    "ContactStatus",
    "Delivery",
    "DeliveryJournal",
    "DispatchKick",
    "DispatchPacer",
    "DispatchQueue",
    "FinalState",
    "GuardedChannel",
    "IdempotencyClaim",
    "IdempotencyLost",
    "IdempotencyRecord",
    "Job",
    "Limits",
    "NotificationApiStore",
    "NotificationDraft",
    "NotificationStore",
    "PersistNotification",
    "ResultCallback",
    "RetryPolicy",
    "RoundReport",
    "RoundResult",
    "RouteNotification",
    "SendResult",
    "SendStatus",
    "ValidateNotification",
    "acceptance",
    "adopt_recorded",
    "dispatch_round",
    "final_state",
    "issue",
    "list_size_issues",
    "register_notification_stages",
    "report_all",
    "rfc3339_ms",
    "type_name",
    "validate_item",
]
