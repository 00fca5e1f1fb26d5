"""A stage for tests: slow while a flag file exists, a pass-through otherwise.

Named in a test's pipelines file as ``tests.e2e.slow_stage:SlowWhenFlagged`` with options
``flag`` (a path) and ``delay_s``; the test creates and removes the file to make the
pipeline slow and fast again without redeploying.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.model import Envelope, Outcome
from stages.ports import Ports


class SlowWhenFlagged:
    name = "slow_when_flagged"

    def __init__(self, flag: str, delay_s: float) -> None:
        self.flag = Path(flag)
        self.delay_s = delay_s

    @classmethod
    def from_config(cls, options: Mapping[str, Any], ports: Ports) -> SlowWhenFlagged:
        return cls(str(options["flag"]), float(options.get("delay_s", 1.0)))

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        if self.flag.exists():
            await asyncio.sleep(self.delay_s)
        return [Outcome.ok(e) for e in batch]
