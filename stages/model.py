"""What travels through a pipeline: the envelope and the per-item outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


@dataclass(slots=True)
class Envelope:
    """One message on its way through a pipeline.

    ``fields`` is what the client sent (type-specific, untrusted until a validation stage
    has looked at it); ``meta`` is what stages learned on the way (message id, seq,
    members, duplicate flag, ...). Envelopes cross process boundaries in batches, so this
    is a plain slotted dataclass: cheap to build and to pickle (a pydantic model cost
    about ten times as much to build and twice as much to pickle).
    """

    type: str
    id: str  # the sender's id for this message: the dedup key
    sender: str
    connection: str | None = None
    gateway: str | None = None  # gateway replica holding the socket
    received_at: float = field(default_factory=time.time)
    fields: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class Verdict(StrEnum):
    CONTINUE = "continue"  # go on to the next stage
    REJECT = "reject"  # refused: the sender is told why (code, message, retry_after)
    DROP = "drop"  # discarded on purpose (only for droppable types), counted
    DONE = "done"  # finished early and successfully: later stages are skipped


@dataclass(slots=True)
class Outcome:
    verdict: Verdict
    envelope: Envelope
    code: str | None = None
    message: str | None = None
    retry_after: float | None = None

    @classmethod
    def ok(cls, envelope: Envelope) -> Outcome:
        return cls(Verdict.CONTINUE, envelope)

    @classmethod
    def reject(
        cls, envelope: Envelope, code: str, message: str, retry_after: float | None = None
    ) -> Outcome:
        return cls(Verdict.REJECT, envelope, code, message, retry_after)

    @classmethod
    def drop(cls, envelope: Envelope, reason: str) -> Outcome:
        return cls(Verdict.DROP, envelope, code=reason, message=reason)

    @classmethod
    def done(cls, envelope: Envelope) -> Outcome:
        return cls(Verdict.DONE, envelope)

    @property
    def settled(self) -> bool:
        """True when no later stage should see this item."""
        return self.verdict is not Verdict.CONTINUE
