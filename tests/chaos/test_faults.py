"""Faults under load on the session's application, each checked by the history checker.

Each test runs 2 chats × (2 senders + 1 reader), 100 messages per sender at 10/s (and,
where the fault hits what checks uploads, 2 attachments per sender), injects one fault 3 s
in, and asserts the checker found nothing (nothing lost, nothing stored twice, seqs
consecutive, receipts monotone, attachments settled) and every frame ended accepted. The
part killed is one Serve or Ray restarts by itself, so the session app heals; the tests
are ``disruptive`` (run last). Result rows: ``test-artifacts/chaos/<fault>.json``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from tests.chaos import faults
from tests.chaos.load import ChatLoad, Shape
from tests.chaos.scenario import assert_clean, run_fault
from tests.conftest import App

pytestmark = [pytest.mark.e2e, pytest.mark.disruptive, pytest.mark.chaos]
APP = "conveyor"


# Two attachments per sender ride along (announced, uploaded, confirmed) where the fault
# hits the servers that check them.
WITH_FILES = Shape(attachments=2)


async def fault_run(conveyor: App, name: str, fault: Any, shape: Shape | None = None
                    ) -> dict[str, Any]:
    verdict, row, _ = await run_fault(name, conveyor.base_url, conveyor.ws_url, conveyor.token,
                                      fault, shape=shape)
    assert_clean(verdict, row)
    return row


async def test_gateway_replica_killed_mid_stream(conveyor: App) -> None:
    async def kill(load: ChatLoad) -> dict[str, Any]:
        # The replica holding most of the load's sockets.
        busiest, held = Counter(p.client.gateway for p in load.peers if p.client).most_common(1)[0]
        names = await asyncio.to_thread(faults.replica_actors, APP, "Gateway")
        victim = next(n for n in names if n.endswith(f"#{busiest}"))
        await asyncio.to_thread(faults.kill_replica, victim)
        healed = await faults.wait_replaced(APP, "Gateway", victim, len(names))
        return {"socketsOnKilledReplica": held, "replicaReplacedS": healed}

    row = await fault_run(conveyor, "gateway-replica-killed", kill, WITH_FILES)
    assert row["reconnects"] >= row["socketsOnKilledReplica"] > 0, row


async def test_stage_host_replica_killed_mid_stream(conveyor: App) -> None:
    async def kill(load: ChatLoad) -> dict[str, Any]:
        names = await asyncio.to_thread(faults.replica_actors, APP, "stages")
        victim = random.choice(names)
        await asyncio.to_thread(faults.kill_replica, victim)
        return {"replicaReplacedS": await faults.wait_replaced(APP, "stages", victim, len(names))}

    await fault_run(conveyor, "stage-replica-killed", kill, WITH_FILES)


@pytest.mark.parametrize("kind", ["hub", "credits", "dedup", "telemetry"])
async def test_state_actor_killed_mid_stream(conveyor: App, kind: str) -> None:
    async def kill(load: ChatLoad) -> dict[str, Any]:
        names = await asyncio.to_thread(faults.state_actors, f"{APP}-{kind}")
        assert names, f"no {kind} actor is running"
        for name in names:
            await asyncio.to_thread(faults.kill_state_actor, name)
        return {"actorsKilled": len(names)}

    await fault_run(conveyor, f"{kind}-actors-killed", kill)


async def test_clients_drop_and_reconnect_at_random(conveyor: App) -> None:
    async def drops(load: ChatLoad) -> dict[str, Any]:
        rng = random.Random(7)
        dropped = 0
        for _ in range(12):
            load.drop(rng.choice(load.peers))
            dropped += 1
            await asyncio.sleep(rng.uniform(0.2, 0.8))
        return {"drops": dropped}

    row = await fault_run(conveyor, "clients-drop", drops)
    assert row["reconnects"] >= 6, row


async def test_postgres_stopped_for_seconds_and_restarted(conveyor: App, pg: Any) -> None:
    async def outage(load: ChatLoad) -> dict[str, Any]:
        try:
            await asyncio.to_thread(faults.stop_postgres, pg)
            await asyncio.sleep(5.0)
        finally:
            await asyncio.to_thread(faults.start_postgres, pg)
        return {"downS": 5.0}

    await fault_run(conveyor, "postgres-restarted", outage, WITH_FILES)
