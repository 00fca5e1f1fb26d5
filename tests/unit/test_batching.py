"""The gateway's bounded buffer and batching, with a fake runner (no Ray cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ray.serve.exceptions import BackPressureError

from deployments.runner import TypeBatcher
from stages.model import Envelope, Outcome
from stages.resolver import StageSpec, TypeSpec


class FlakyRunner:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[list[str]] = []

    async def run(self, type_name: str, route: int, batch: Sequence[Envelope]) -> list[Outcome]:
        self.calls.append([e.id for e in batch])
        if self.failures > 0:
            self.failures -= 1
            raise BackPressureError(num_queued_requests=10, max_queued_requests=10)
        return [Outcome.done(e) for e in batch]


def spec(durable: bool) -> TypeSpec:
    return TypeSpec("chat" if durable else "signal", durable, "block" if durable else "drop",
                    (StageSpec("x"),))


def env(i: int) -> Envelope:
    return Envelope(type="chat", id=str(i), sender="u")


async def run_batcher(durable: bool, failures: int) -> tuple[FlakyRunner, list[str], list[str],
                                                             TypeBatcher]:
    runner = FlakyRunner(failures)
    settled: list[str] = []
    dropped: list[str] = []

    async def on_outcomes(outcomes: list[Outcome]) -> None:
        settled.extend(o.envelope.id for o in outcomes)

    b = TypeBatcher(spec(durable), runner, on_outcomes, capacity=4, wait_ms=1, max_batch=3,  # type: ignore[arg-type]
                    on_drop=lambda e, reason: dropped.append(f"{e.id}:{reason}"))
    for i in range(4):
        assert b.offer(env(i))
    assert not b.offer(env(99)) and b.full  # bounded
    b.start()
    for _ in range(200):
        await asyncio.sleep(0.01)
        if len(settled) + len(dropped) >= 4:
            break
    await b.stop()
    return runner, settled, dropped, b


async def test_durable_batches_are_retried_until_the_stage_takes_them() -> None:
    runner, settled, dropped, b = await run_batcher(durable=True, failures=2)
    assert sorted(settled) == ["0", "1", "2", "3"] and dropped == []
    assert b.retries == 2
    assert runner.calls[:3] == [["0", "1", "2"]] * 3  # same batch, in order, until accepted


async def test_droppable_batches_refused_by_a_stage_are_dropped_and_counted() -> None:
    _, settled, dropped, _ = await run_batcher(durable=False, failures=1)
    assert dropped == ["0:stage_refused", "1:stage_refused", "2:stage_refused"]
    assert settled == ["3"]
