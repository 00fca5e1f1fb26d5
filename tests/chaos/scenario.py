"""One fault test: load, the fault injected mid-run, the checker, and the result row.

The row (offered / accepted / delivered / lost / duplicates / recovery seconds, and the
run's other figures) is printed and written to ``test-artifacts/chaos/<name>.json``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from tests.chaos.history import History, Verdict, check, recovery_s
from tests.chaos.load import ChatLoad, Shape

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "chaos"

# The fault: given the running load, break something; returns extra figures for the row.
Fault = Callable[[ChatLoad], Awaitable[dict[str, Any] | None]]


async def run_fault(name: str, base_url: str, ws_url: str, token: Callable[[str], str],
                    fault: Fault, *, shape: Shape | None = None, at_s: float = 3.0
                    ) -> tuple[Verdict, dict[str, Any], History]:
    """Run ``shape`` (default: 2 chats × 2 senders + 1 reader, 100 messages per sender at
    10/s) and inject ``fault`` ``at_s`` seconds in; returns the checker's verdict, the row
    written to the artifacts, and the history."""
    load = ChatLoad(base_url, ws_url, token, shape or Shape())
    await load.open()
    extra: dict[str, Any] = {}
    fault_at: list[float] = []

    async def during() -> None:
        await asyncio.sleep(at_s)
        fault_at.append(load.history.fault(name))
        extra.update(await fault(load) or {})

    t0 = time.monotonic()
    try:
        await load.run(during)
    finally:
        await load.finish()
    verdict = check(load.history)
    recovery = recovery_s(load.history, fault_at[0]) if fault_at else None
    row = verdict.row(fault=name, recoveryS=recovery, attachments=len(load.history.uploaded),
                      wallS=round(time.monotonic() - t0, 1), **load.counts(), **extra)
    write_row(name, row, verdict)
    return verdict, row, load.history


def write_row(name: str, row: dict[str, Any], verdict: Verdict) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    doc = {**row, "violationsDetail": verdict.violations[:50]}
    (ARTIFACTS / f"{name}.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    print(f"\nchaos {name}: " + orjson.dumps(row).decode())


def assert_clean(verdict: Verdict, row: dict[str, Any]) -> None:
    """What every fault test asserts: no rule broken, nothing lost or duplicated, every
    frame settled (accepted: a refusal is retried until accepted), and service back."""
    assert verdict.violations == [], "\n".join(verdict.violations[:30])
    assert (row["lost"], row["duplicates"], row["unsettled"], row["pendingAtEnd"]) == (0, 0, 0, 0), row
    assert row["accepted"] == row["offered"] > 0, row
    assert row["recoveryS"] is not None, row
