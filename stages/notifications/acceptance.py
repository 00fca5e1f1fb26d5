"""The answer to one POST of notifications (202, 207 or 400 in the seed's shapes), and
what the envelopes of that request share while they run through the pipeline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from stages.model import Envelope
from stages.notifications.ports import IdempotencyRecord


def acceptance(items: Sequence[Any], batch: Sequence[Envelope], texts: Mapping[str, str]
               ) -> tuple[int, bytes]:
    """(status, JSON body) for a POST whose items were validated. An item is accepted
    when validation gave it its server fields (``meta["notification"]``) and no errors.
    ``texts`` holds the messages in the client's language (keys ``all``, ``partial``,
    ``none``)."""
    details: list[dict[str, Any]] = []
    accepted = 0
    for item, env in zip(items, batch, strict=True):
        errors = env.meta.get("errors")
        n = env.meta.get("notification")
        if n is not None and not errors:
            accepted += 1
            details.append({"status": "success", "notification": n})
        else:
            details.append({"status": "failure", "notification": item, "error": errors or [
                {"code": "custom", "message": "rejected", "path": []}]})
    rejected = len(items) - accepted
    if accepted == 0:
        return 400, orjson.dumps({
            "error": "HTTP 400 Bad Request", "message": texts["none"],
            "details": [{"item": d["notification"], "error": d["error"]} for d in details],
        })
    key = "all" if rejected == 0 else "partial"
    return 202 if rejected == 0 else 207, orjson.dumps({
        "message": texts[key].format(accepted=accepted, rejected=rejected),
        "totalCount": len(items), "acceptedCount": accepted, "rejectedCount": rejected,
        "details": details,
    })


class AcceptRequest:
    """What the envelopes of one POST share (``meta["request"]``): the items as sent, the
    envelopes made of them, the response texts, and the idempotency claim if any. The
    response is computed once (by :func:`acceptance`) and kept, so what is stored with
    the key is exactly what the client is answered."""

    def __init__(self, items: Sequence[Any], texts: Mapping[str, str], *,
                 subject_id: str | None = None, key: str | None = None,
                 claim: str | None = None) -> None:
        self.items = list(items)
        self.texts = dict(texts)
        self.envelopes: list[Envelope] = []
        self.subject_id = subject_id
        self.key = key
        self.claim = claim
        self.persisted = False  # the notifications (and the key's response) were committed
        self._response: tuple[int, bytes] | None = None

    def response(self) -> tuple[int, bytes]:
        if self._response is None:
            self._response = acceptance(self.items, self.envelopes, self.texts)
        return self._response

    def record(self) -> IdempotencyRecord | None:
        if self.key is None or self.subject_id is None or self.claim is None:
            return None
        status, body = self.response()
        return IdempotencyRecord(self.subject_id, self.key, self.claim, status, body)
