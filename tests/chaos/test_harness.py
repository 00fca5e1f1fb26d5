"""The chaos load and checker end to end against tests/chaos/fake_server.py (no Ray): a
correct server passes, dropped connections and lost acks included, and each server bug
switched on is caught by the rule it breaks."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.chaos.fake_server import Bugs, FakeServer, serving
from tests.chaos.history import Verdict, check
from tests.chaos.load import ChatLoad, Shape

pytestmark = pytest.mark.chaos

SHAPE = Shape(chats=2, senders=2, readers=1, messages=30, rate=60.0, ack_timeout_s=1.0,
              settle_s=3.0)


async def run(bugs: Bugs | None = None, drops: int = 0,
              hidden: int | None = None) -> tuple[Verdict, ChatLoad]:
    """The load against a fake server with ``bugs``; ``hidden``: the index of the peer
    that ``bugs`` names (filled in once the users exist)."""
    server = FakeServer(bugs)
    async with serving(server) as (base, ws):
        load = ChatLoad(base, ws, lambda user: user, SHAPE)
        await load.open()
        if hidden is not None and bugs is not None:
            who = load.peers[hidden].user
            bugs.hide_from = who if bugs.hide_from == "?" else bugs.hide_from
            bugs.gap_user = who if bugs.gap_user == "?" else bugs.gap_user
        rng = random.Random(3)

        async def drop_some() -> None:
            for _ in range(drops):
                await asyncio.sleep(0.1)
                load.drop(rng.choice(load.peers))

        await load.run(drop_some)
        await load.finish()
    return check(load.history), load


async def test_a_correct_server_passes_with_drops_and_lost_acks() -> None:
    verdict, load = await run(Bugs(lose_ack_every=7), drops=4)
    assert verdict.violations == []
    assert (verdict.offered, verdict.accepted, verdict.lost, verdict.duplicates) == (120, 120, 0, 0)
    assert load.counts()["reconnects"] >= 1
    # Lost acks were answered "duplicate" on resend: the protocol's way, not a violation.
    assert any(e.frame.get("status") == "duplicate" for e in load.history.events)


async def test_forgotten_dedup_is_caught_as_duplicates() -> None:
    verdict, _ = await run(Bugs(forget_dedup=True, lose_ack_every=5))
    assert verdict.duplicates > 0
    assert any(v.startswith("rule 1:") and "stored under" in v for v in verdict.violations)


async def test_a_member_never_given_messages_is_caught_as_lost() -> None:
    verdict, load = await run(Bugs(hide_from="?"), hidden=-1)
    hidden = load.peers[-1].user
    assert verdict.lost > 0
    assert any(v.startswith("rule 2:") and hidden in v for v in verdict.violations)


async def test_a_hole_in_a_live_stream_is_caught() -> None:
    verdict, load = await run(Bugs(gap_user="?"), hidden=-1)
    gappy = load.peers[-1].user
    rule3 = [v for v in verdict.violations if v.startswith("rule 3:")]
    assert rule3 and all(gappy in v for v in rule3), verdict.violations
