"""The chat benchmark's core against the session app, with tiny numbers: every message
acked, delivered, receipted and stored exactly once, in seq order per chat. No timing."""

from __future__ import annotations

import pytest

from bench.chat import Target, run_chat
from tests.conftest import App

pytestmark = pytest.mark.e2e

PAIRS, MESSAGES = 2, 20


async def test_bench_core_delivers_everything_exactly_once_in_order(conveyor: App) -> None:
    target = Target("conveyor", conveyor.base_url, conveyor.ws_url, conveyor.token)
    run = await run_chat(target, PAIRS, MESSAGES, inflight=5, timeout_s=60.0)
    assert not run.timed_out
    assert len(run.pairs) == PAIRS
    for p in run.pairs:
        assert p.sent == MESSAGES
        assert not p.rejections and not p.errors
        # Acked: each client id once, accepted, seq in the order the sender sent them.
        assert len(p.acks) == MESSAGES == p.ack_frames
        assert all(a["status"] == "accepted" and a["chatId"] == p.chat_id for a in p.acks.values())
        by_seq = [p.acks[f"{p.sender}-{i}"]["messageId"] for i in range(MESSAGES)]
        assert [p.acks[f"{p.sender}-{i}"]["seq"] for i in range(MESSAGES)] == list(range(1, MESSAGES + 1))
        assert len(set(by_seq)) == MESSAGES
        # Delivered once each, in seq order, nothing else.
        assert p.deliveries == [(m, s) for s, m in enumerate(by_seq, 1)]
        assert p.redelivered == 0
        assert p.out_of_order() == 0
        # Receipted, and the server applied the receipts.
        assert p.receipted == set(by_seq)
        assert p.delivered_seq == p.last_seq == MESSAGES
        # Stored once each, in seq order.
        assert p.stored == [(m, s) for s, m in enumerate(by_seq, 1)]
    summary = run.summary()
    n = PAIRS * MESSAGES
    assert (summary["sent"], summary["acked"], summary["delivered"], summary["receipted"],
            summary["stored"], summary["receiptedStored"]) == (n, n, n, n, n, n)
    assert summary["lost"] == summary["lostStored"] == summary["storedDuplicates"] == 0
    assert summary["outOfOrder"] == summary["storedSeqGaps"] == 0
