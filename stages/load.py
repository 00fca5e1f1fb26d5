"""Client-level backpressure: the credits stage."""

from __future__ import annotations

import math
from collections.abc import Sequence

from stages.model import Envelope, Outcome
from stages.ports import CreditBank, Notices, Outages


def crossed_low_water(remaining: int, cost: int, low_water: int) -> bool:
    """Did this granted debit take the bucket from ``low_water`` or more to below it?

    A bucket refills before it is debited and a granted debit takes exactly ``cost``, so
    the bucket held ``remaining + cost`` just before: the bank's answer already says
    whether it was above the mark."""
    return remaining < low_water <= remaining + cost


class DebitCredits:
    """Debits each message's cost (``meta.cost``, set from the type's configuration) from
    the sender's bucket, in one bank call per batch.

    Refused: the item is rejected with ``credits_exhausted`` and ``retryAfter``, and the
    sender gets a ``system`` ``credits_exhausted`` frame. A debit that takes the bucket
    from ``low_water`` or more to below it: a ``system`` ``credits_low`` frame, once per
    crossing, not on every message sent below the mark. If the bank is unreachable,
    messages pass (reported to ``outages``): losing the bank must not stop the service.
    """

    name = "debit_credits"

    def __init__(self, bank: CreditBank, notices: Notices, low_water: int = 5,
                 outages: Outages | None = None) -> None:
        self.bank = bank
        self.notices = notices
        self.low_water = low_water
        self.outages = outages

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        requests = [(e.sender, int(e.meta.get("cost", 1))) for e in batch]
        try:
            answers = await self.bank.debit(requests)
        except Exception:
            if self.outages is not None:
                self.outages.unavailable("credits", self.name, len(batch))
            return [Outcome.ok(e) for e in batch]
        out: list[Outcome] = []
        warned: set[tuple[str | None, str]] = set()  # one notice per connection and event
        for env, (_, cost), ans in zip(batch, requests, answers, strict=True):
            if ans.granted:
                if crossed_low_water(ans.remaining, cost, self.low_water):
                    self.notices.notify(env.connection, "credits_low",
                                        {"remaining": ans.remaining})
                out.append(Outcome.ok(env))
                continue
            # Never (a cost above the bucket's capacity, or no refills): no retry time.
            retry = round(ans.retry_after, 3) if math.isfinite(ans.retry_after) else None
            if (env.connection, "exhausted") not in warned:
                warned.add((env.connection, "exhausted"))
                self.notices.notify(env.connection, "credits_exhausted", {"retryAfter": retry})
            out.append(Outcome.reject(
                env, "credits_exhausted",
                f"no credits left; retry in {retry} s" if retry is not None
                else "this message costs more credits than a user can hold", retry))
        return out
