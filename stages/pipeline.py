"""The Stage protocol and the Pipeline that runs stages over a batch.

A stage is an async function over a *batch*: it returns exactly one Outcome per input
envelope, in the same order. A Pipeline feeds each stage only the items still marked
CONTINUE and keeps every item's last outcome, so one bad item never holds up the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from stages.model import Envelope, Outcome


class StageError(Exception):
    """A stage broke its contract (for instance returned the wrong number of outcomes)."""


@runtime_checkable
class Stage(Protocol):
    name: str

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        """One outcome per envelope, same order. Raising fails the whole batch."""
        ...


# Called after each stage with (stage name, seconds, items) — metrics hook.
StageObserver = Callable[[str, float, int], None]


class Pipeline:
    def __init__(self, stages: Sequence[Stage], observer: StageObserver | None = None) -> None:
        self.stages = list(stages)
        self.observer = observer

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    async def run(self, batch: Sequence[Envelope]) -> list[Outcome]:
        outcomes = [Outcome.ok(e) for e in batch]
        for stage in self.stages:
            live = [i for i, o in enumerate(outcomes) if not o.settled]
            if not live:
                break
            t0 = time.perf_counter()
            results = await stage.process([outcomes[i].envelope for i in live])
            if self.observer is not None:
                self.observer(stage.name, time.perf_counter() - t0, len(live))
            if len(results) != len(live):
                raise StageError(
                    f"stage {stage.name!r} returned {len(results)} outcomes for {len(live)} items"
                )
            for i, result in zip(live, results, strict=True):
                outcomes[i] = result
        return outcomes
