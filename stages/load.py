"""Client-level backpressure: the credits stage."""

from __future__ import annotations

from collections.abc import Sequence

from stages.model import Envelope, Outcome
from stages.ports import CreditBank, Notices


class DebitCredits:
    """Debits each message's cost (``meta.cost``, set from the type's configuration) from
    the sender's bucket, in one bank call per batch.

    Refused: the item is rejected with ``credits_exhausted`` and ``retryAfter``, and the
    sender gets a ``system`` ``credits_exhausted`` frame. Granted but below ``low_water``:
    a ``system`` ``credits_low`` frame. If the bank is unreachable, messages pass (and
    ``meta.credits_unchecked`` is set): losing the bank must not stop the service.
    """

    name = "debit_credits"

    def __init__(self, bank: CreditBank, notices: Notices, low_water: int = 5) -> None:
        self.bank = bank
        self.notices = notices
        self.low_water = low_water
        self.unavailable = 0

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        requests = [(e.sender, int(e.meta.get("cost", 1))) for e in batch]
        try:
            answers = await self.bank.debit(requests)
        except Exception:
            self.unavailable += 1
            for e in batch:
                e.meta["credits_unchecked"] = True
            return [Outcome.ok(e) for e in batch]
        out: list[Outcome] = []
        warned: set[tuple[str | None, str]] = set()  # one notice per connection and event
        for env, ans in zip(batch, answers, strict=True):
            if ans.granted:
                if ans.remaining < self.low_water and (env.connection, "low") not in warned:
                    warned.add((env.connection, "low"))
                    self.notices.notify(env.connection, "credits_low",
                                        {"remaining": ans.remaining})
                out.append(Outcome.ok(env))
                continue
            retry = round(ans.retry_after, 3)
            if (env.connection, "exhausted") not in warned:
                warned.add((env.connection, "exhausted"))
                self.notices.notify(env.connection, "credits_exhausted", {"retryAfter": retry})
            out.append(Outcome.reject(env, "credits_exhausted",
                                      f"no credits left; retry in {retry} s", retry))
        return out
