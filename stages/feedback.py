"""The feedback loop: how fast a poller (outbox relay, consumer) may feed the pipeline.

An AIMD controller. Each round the poller reports what it saw downstream: how long the
hand-off took, how deep the downstream queue is, whether work was refused. While the
system is healthy the batch grows additively and the poll interval shrinks back to its
minimum; under pressure the batch halves and the interval doubles; past the saturation
mark the poller pauses entirely. Nothing is dropped: unread work waits where it is durable
(the outbox table, a Kafka partition) and is read when the pace recovers by itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaceConfig:
    min_interval_s: float = 0.05
    max_interval_s: float = 5.0
    min_batch: int = 10
    max_batch: int = 500
    step: int = 50
    target_latency_s: float = 0.25
    high_backlog: int = 5_000
    saturated_backlog: int = 50_000


class Pacer:
    def __init__(self, config: PaceConfig | None = None) -> None:
        self.config = config or PaceConfig()
        self.batch = self.config.max_batch
        self.interval_s = self.config.min_interval_s
        self.paused = False
        self.pressure_events = 0

    def observe(self, *, latency_s: float, backlog: int, refused: bool = False) -> None:
        c = self.config
        self.paused = backlog >= c.saturated_backlog
        pressured = refused or latency_s > c.target_latency_s or backlog >= c.high_backlog
        if self.paused or pressured:
            self.pressure_events += 1
            self.batch = max(c.min_batch, self.batch // 2)
            self.interval_s = min(c.max_interval_s, self.interval_s * 2)
        else:
            self.batch = min(c.max_batch, self.batch + c.step)
            self.interval_s = max(c.min_interval_s, self.interval_s / 2)

    @property
    def state(self) -> str:
        if self.paused:
            return "paused"
        if self.batch < self.config.max_batch or self.interval_s > self.config.min_interval_s:
            return "throttled"
        return "normal"
