"""Pacing of the dispatcher's loops (the feedback loop of ``stages/feedback.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from stages.feedback import PaceConfig, Pacer


@dataclass(frozen=True, slots=True)
class RoundReport:
    """What one dispatch round saw downstream."""

    latency_s: float  # how long the round took (sends + recording)
    attempts: int = 0  # real sends plus pass-overs
    failures: int = 0  # transient failures and pass-overs (channel not working)
    channels_down: bool = False  # every configured channel is not working now
    error: bool = False  # the round could not run (store or channel raised)


class DispatchPacer:
    """How much a dispatcher loop claims per round and how long it waits between rounds.

    An AIMD ``Pacer``: a round slower than ``target_latency_s``, a round that failed, or
    one where at least ``failure_ratio`` of the attempts failed transiently or found their
    channel not working halves the batch and doubles the interval (up to
    ``max_interval_s``); a healthy round grows the batch by a tenth of ``batch_size`` and
    halves the interval back towards ``interval_s``. When every channel is down the loop
    is *paused*: it claims nothing (claiming would only pass work over) until a channel
    works again — a breaker half-opening is enough — and then recovers by itself.
    """

    def __init__(self, batch_size: int, interval_s: float, *, target_latency_s: float = 10.0,
                 failure_ratio: float = 0.5, max_interval_s: float | None = None) -> None:
        batch_size = max(1, batch_size)
        self.failure_ratio = failure_ratio
        self.pacer = Pacer(PaceConfig(
            min_interval_s=interval_s,
            max_interval_s=max(interval_s, max_interval_s if max_interval_s is not None
                               else max(interval_s * 16, 30.0)),
            min_batch=max(1, batch_size // 10),
            max_batch=batch_size,
            step=max(1, batch_size // 10),
            target_latency_s=target_latency_s,
            # "backlog" here is 1 when every channel is down: that alone pauses the loop.
            high_backlog=1,
            saturated_backlog=1,
        ))

    @property
    def batch(self) -> int:
        return self.pacer.batch

    @property
    def interval_s(self) -> float:
        return self.pacer.interval_s

    @property
    def paused(self) -> bool:
        return self.pacer.paused

    @property
    def state(self) -> str:
        return self.pacer.state

    def observe(self, report: RoundReport) -> None:
        failing = report.attempts > 0 and report.failures >= self.failure_ratio * report.attempts
        self.pacer.observe(latency_s=report.latency_s, backlog=1 if report.channels_down else 0,
                           refused=report.error or failing)
