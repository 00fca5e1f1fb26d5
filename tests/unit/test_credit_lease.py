"""The leased credit bank: local spending, background top-ups, the cluster-wide limit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from cluster.credit_lease import LeasedCredits
from stages.buckets import Lease, TokenBuckets


class Bank:
    """The bank's arithmetic without Ray, on a clock the test moves."""

    def __init__(self, capacity: int = 20, refill: int = 20, interval_s: float = 10.0) -> None:
        self.buckets = TokenBuckets(capacity, refill, interval_s)
        self.now = 0.0
        self.calls: list[list[tuple[str, int]]] = []

    async def lease(self, requests: Sequence[tuple[str, int]]) -> list[Lease]:
        self.calls.append(list(requests))
        return [self.buckets.take(u, n, self.now) for u, n in requests]

    async def refund(self, returns: Sequence[tuple[str, int]]) -> None:
        for u, n in returns:
            self.buckets.give(u, n, self.now)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_batches_are_debited_locally_once_a_lease_is_held() -> None:
    bank = Bank()
    credits = LeasedCredits(bank, lease_size=8)
    first = await credits.debit([("alice", 1), ("alice", 1)])
    assert all(d.granted for d in first) and bank.calls == [[("alice", 2)]]
    await settle()  # the lease was low: topped up in the background
    assert bank.calls[1] == [("alice", 8)]
    calls = len(bank.calls)
    for _ in range(3):
        assert all(d.granted for d in await credits.debit([("alice", 1)]))
    assert len(bank.calls) == calls  # spent from the lease, no bank call


async def test_a_lease_that_runs_dry_grows_so_a_busy_sender_rarely_calls_the_bank() -> None:
    bank = Bank(capacity=10_000, refill=10_000)
    credits = LeasedCredits(bank, lease_size=2, max_lease=64)
    on_path = []  # bank calls a batch waited for (the background top-ups are not counted)
    for _ in range(20):
        before = len(bank.calls)
        assert all(d.granted for d in await credits.debit([("alice", 1)] * 10))
        on_path.append(len(bank.calls) - before)
        await settle()
    # 2 → 4 → 8 → 16: doubled each time a batch found it dry, until it covers a batch.
    assert credits.held["alice"].size == 16
    assert on_path[:4] == [1, 1, 1, 1] and sum(on_path[4:]) == 0
    # Everything leased is accounted for: spent (200) or held.
    taken = sum(n for call in bank.calls for _, n in call)
    assert taken - credits.held["alice"].credits == 200
    capped = LeasedCredits(Bank(capacity=10_000, refill=10_000), lease_size=2, max_lease=5)
    for _ in range(5):
        await capped.debit([("bob", 1)] * 10)
        await settle()
    assert capped.held["bob"].size == 5


async def test_two_gateways_together_never_spend_more_than_the_bank_holds() -> None:
    bank = Bank(capacity=20, refill=20, interval_s=10.0)
    a, b = LeasedCredits(bank, lease_size=6), LeasedCredits(bank, lease_size=6)
    granted = 0
    for i in range(30):
        gw = a if i % 2 else b
        granted += sum(d.granted for d in await gw.debit([("alice", 1)]))
        await settle()
    assert granted <= 20  # one bucket of 20 and no refill yet
    assert granted >= 20 - 2 * 6  # at most one lease per gateway is stranded


async def test_a_refusal_says_when_the_missing_credits_are_back() -> None:
    bank = Bank(capacity=5, refill=5, interval_s=10.0)
    credits = LeasedCredits(bank, lease_size=4)
    assert all(d.granted for d in await credits.debit([("bob", 5)]))
    bank.now = 4.0
    (refused,) = await credits.debit([("bob", 1)])
    assert not refused.granted and refused.retry_after == pytest.approx(6.0)


async def test_idle_leases_go_back_to_the_bank() -> None:
    bank = Bank(capacity=10, refill=10, interval_s=10.0)
    credits = LeasedCredits(bank, lease_size=6, idle_s=0.0)
    await credits.debit([("carol", 1)])
    await settle()
    assert bank.buckets.level("carol", 0.0) < 9
    returned = await credits.give_back(idle_only=True)
    assert returned > 0 and bank.buckets.level("carol", 0.0) == 9  # only the one spent is gone


async def test_a_batch_short_while_a_top_up_is_on_its_way_waits_for_it() -> None:
    """Capacity 3: the first batch leases 1, the top-up brings the other 2; a batch that
    comes meanwhile is covered by that top-up, not refused by a race at the bank."""

    class SlowBank(Bank):
        """Top-ups (more than one credit wanted) come back slowly."""

        async def lease(self, requests: Sequence[tuple[str, int]]) -> list[Lease]:
            got = await super().lease(requests)
            if any(n > 1 for _, n in requests):
                await asyncio.sleep(0.2)
            return got

    credits = LeasedCredits(SlowBank(capacity=3, refill=3, interval_s=60.0), lease_size=10)
    assert (await credits.debit([("dan", 1)]))[0].granted
    await asyncio.sleep(0)  # the top-up has taken the other 2 at the bank, not yet back
    assert credits._topping is not None and not credits._topping.done()
    (second,) = await credits.debit([("dan", 1)])
    (third,) = await credits.debit([("dan", 1)])
    assert second.granted and third.granted
    (fourth,) = await credits.debit([("dan", 1)])
    assert not fourth.granted and fourth.retry_after > 0


async def test_a_batch_larger_than_the_bucket_is_refused_with_a_finite_retry_time() -> None:
    bank = Bank(capacity=3, refill=3, interval_s=60.0)
    credits = LeasedCredits(bank, lease_size=10)
    answers = await credits.debit([("erin", 1)] * 6)
    assert [d.granted for d in answers] == [True, True, True, False, False, False]
    assert all(0 < d.retry_after <= 60.0 for d in answers[3:])
