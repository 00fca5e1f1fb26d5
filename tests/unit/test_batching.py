"""The gateway's bounded buffer, batching and resumable runs, with fakes (no Ray cluster)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping, Sequence
from copy import deepcopy
from typing import Any

from ray.serve.exceptions import BackPressureError

from deployments.batcher import TypeBatcher
from deployments.gateway.connection import Connection
from deployments.pipeline_runner import PipelineRunner, RunProgress
from stages.model import Envelope, Outcome, Verdict
from stages.resolver import Resolver, StageRegistry, StageSpec, TypeSpec


class FlakyRunner:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[list[str]] = []

    async def run(self, type_name: str, route: int, batch: Sequence[Envelope],
                  progress: RunProgress | None = None) -> list[Outcome]:
        self.calls.append([e.id for e in batch])
        if self.failures > 0:
            self.failures -= 1
            raise BackPressureError(num_queued_requests=10, max_queued_requests=10)
        return [Outcome.done(e) for e in batch]


def spec(durable: bool) -> TypeSpec:
    return TypeSpec("chat" if durable else "signal", durable, "block" if durable else "drop",
                    (StageSpec("x"),))


def env(i: int, type_name: str = "chat") -> Envelope:
    return Envelope(type=type_name, id=str(i), sender="u", connection="c1")


async def settle(batcher: TypeBatcher, done: Any, rounds: int = 300) -> None:
    batcher.start()
    for _ in range(rounds):
        await asyncio.sleep(0.01)
        if done():
            break
    await batcher.stop()


async def run_batcher(durable: bool, failures: int) -> tuple[FlakyRunner, list[str], list[str],
                                                             TypeBatcher, list[str]]:
    runner = FlakyRunner(failures)
    settled: list[str] = []
    dropped: list[str] = []
    retried: list[str] = []

    async def on_outcomes(outcomes: list[Outcome]) -> None:
        settled.extend(o.envelope.id for o in outcomes)

    b = TypeBatcher(spec(durable), runner, on_outcomes, capacity=4, wait_ms=1, max_batch=3,  # type: ignore[arg-type]
                    on_drop=lambda e, reason, host: dropped.append(f"{e.id}:{reason}@{host}"),
                    on_retry=retried.append)
    for i in range(4):
        assert b.offer(env(i))
    assert not b.offer(env(99)) and b.full  # bounded
    await settle(b, lambda: len(settled) + len(dropped) >= 4)
    return runner, settled, dropped, b, retried


async def test_durable_batches_are_retried_until_the_stage_takes_them() -> None:
    runner, settled, dropped, b, retried = await run_batcher(durable=True, failures=2)
    assert sorted(settled) == ["0", "1", "2", "3"] and dropped == []
    assert b.retries == 2 and retried == ["chat", "chat"]  # counted (stage_retries_total)
    assert runner.calls[:3] == [["0", "1", "2"]] * 3  # same batch, in order, until accepted


async def test_droppable_batches_refused_by_a_stage_are_dropped_and_counted() -> None:
    _, settled, dropped, _, retried = await run_batcher(durable=False, failures=1)
    assert dropped == ["0:stage_refused@gateway", "1:stage_refused@gateway",
                       "2:stage_refused@gateway"]
    assert settled == ["3"] and retried == []


# --- a real PipelineRunner over fake stage hosts ------------------------------------------

class Counting:
    """A stage run in the gateway that records every item it sees."""

    def __init__(self, name: str, seen: Counter[str]) -> None:
        self.name = name
        self.seen = seen

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        for e in batch:
            self.seen[f"{self.name}:{e.id}"] += 1
        return [Outcome.ok(e) for e in batch]


class FakeHost:
    """Stands in for a StageHost deployment handle: ``handle.run.remote(...)``. Fails (or
    refuses) the first ``failures[stage]`` calls whose segment starts with that stage."""

    def __init__(self, resolver: Resolver, failures: Mapping[str, list[BaseException]]) -> None:
        self.resolver = resolver
        self.failures = {k: list(v) for k, v in failures.items()}
        self.calls: list[tuple[str, ...]] = []
        self.run = self

    async def remote(self, type_name: str, route: int, start: int, stop: int,
                     items: list[Envelope]) -> list[Outcome]:
        names = tuple(s.name for s in self.resolver.spec(type_name).stages_for(route)[start:stop])
        self.calls.append(names)
        pending = self.failures.get(names[0])
        if pending:
            raise pending.pop(0)
        # A remote host answers with copies, as Ray does.
        out = []
        for e in items:
            copy = deepcopy(e)
            if "invalid" in names and copy.fields.get("bad"):
                out.append(Outcome.reject(copy, "invalid", "bad"))
                continue
            copy.meta.setdefault("ran", []).extend(names)
            out.append(Outcome.done(copy) if names[-1] in ("deliver", "forward")
                       else Outcome.ok(copy))
        return out


PIPELINES = """
version: 1
types:
  chat:
    durable: true
    stages: [debit, invalid, persist, ack, track, deliver]
  signal:
    durable: false
    overflow: drop
    stages: [debit, invalid, dedup, ack, forward]
"""


def runner_with(failures: Mapping[str, list[BaseException]]
                ) -> tuple[PipelineRunner, FakeHost, FakeHost, Counter[str]]:
    seen: Counter[str] = Counter()
    registry = StageRegistry()
    for name in ("debit", "ack", "track"):
        registry.register(name, lambda o, p, name=name: Counting(name, seen))  # type: ignore[misc]
    for name in ("invalid", "persist", "deliver", "dedup", "forward"):
        registry.register(name, lambda o, p: Counting("never-local", seen))
    resolver = Resolver.from_yaml(PIPELINES, registry)
    stages_host = FakeHost(resolver, failures)
    edge_host = FakeHost(resolver, failures)
    hosts = {"invalid": "stages", "persist": "stages", "deliver": "stages",
             "dedup": "edge", "forward": "edge"}
    runner = PipelineRunner(resolver, registry, hosts, {"stages": stages_host, "edge": edge_host},
                            local_ports={})
    return runner, stages_host, edge_host, seen


async def test_a_retry_resumes_at_the_segment_that_failed() -> None:
    # deliver fails once after persist, ack and track ran: the retry must not debit, ack
    # or count the batch again.
    runner, stages_host, _, seen = runner_with({"deliver": [ConnectionError("hub is gone")]})
    assert runner.segments(runner.resolver.spec("chat"), -1) == [
        ("gateway", 0, 1), ("stages", 1, 3), ("gateway", 3, 4), ("gateway", 4, 5),
        ("stages", 5, 6)]
    settled: list[Outcome] = []
    retried: list[str] = []

    async def on_outcomes(outcomes: list[Outcome]) -> None:
        settled.extend(outcomes)

    b = TypeBatcher(runner.resolver.spec("chat"), runner, on_outcomes, capacity=8, wait_ms=1,
                    max_batch=8, on_drop=lambda e, r, h: None, on_retry=retried.append)
    for i in range(3):
        assert b.offer(env(i))
    await settle(b, lambda: len(settled) >= 3)

    assert retried == ["chat"] and b.retries == 1
    assert seen == {f"{stage}:{i}": 1 for stage in ("debit", "ack", "track") for i in range(3)}
    assert stages_host.calls == [("invalid", "persist"), ("deliver",), ("deliver",)]
    assert [o.verdict for o in settled] == [Verdict.DONE] * 3
    assert all(o.envelope.meta["ran"] == ["invalid", "persist", "deliver"] for o in settled)


async def test_a_droppable_batch_refused_by_a_host_is_dropped_against_that_host() -> None:
    refused = BackPressureError(num_queued_requests=4, max_queued_requests=4)
    runner, _, edge_host, seen = runner_with({"dedup": [refused]})
    settled: list[Outcome] = []
    dropped: list[tuple[str, str, str]] = []

    async def on_outcomes(outcomes: list[Outcome]) -> None:
        settled.extend(outcomes)

    b = TypeBatcher(runner.resolver.spec("signal"), runner, on_outcomes, capacity=8, wait_ms=1,
                    max_batch=8, on_drop=lambda e, r, h: dropped.append((e.id, r, h)))
    for i in range(3):
        item = env(i, "signal")
        item.fields["bad"] = i == 1
        assert b.offer(item)
    await settle(b, lambda: len(settled) + len(dropped) >= 3)

    # The invalid one keeps its rejection (the sender hears why); the others are dropped,
    # counted against the host that refused them; nothing after the refusal ran.
    assert dropped == [("0", "stage_refused", "edge"), ("2", "stage_refused", "edge")]
    assert [(o.envelope.id, o.verdict, o.code) for o in settled] == [
        ("1", Verdict.REJECT, "invalid")]
    assert not any(k.startswith("ack:") for k in seen) and b.retries == 0
    assert edge_host.calls == [("dedup",)]


async def test_a_failing_host_is_named_in_the_error_a_direct_run_raises() -> None:
    from deployments.pipeline_runner import SegmentFailed, blame

    runner, _, _, _ = runner_with({"invalid": [TimeoutError()]})
    batch = [env(1)]
    progress = RunProgress.start(batch)
    try:
        await runner.run("chat", -1, batch, progress)
    except SegmentFailed as exc:
        assert (exc.host, exc.stages, exc.refused) == ("stages", ["invalid", "persist"], False)
        assert blame(exc) == ("stages", "stage_failed")
    else:
        raise AssertionError("the failing segment must raise")
    assert progress.next_segment == 1  # debit ran; the retry starts at the stage host
    out = await runner.run("chat", -1, batch, progress)
    assert [o.verdict for o in out] == [Verdict.DONE]


# --- overload notices, once per episode --------------------------------------------------

def test_overload_is_announced_once_per_episode_per_connection() -> None:
    conn = Connection(None, "u", None, None, queue_size=4,  # type: ignore[arg-type]
                      implicit_receipt=lambda u, m: None)
    assert conn.overload_started("chat")  # first frame that waits: tell the client
    assert not conn.overload_started("chat")  # still the same episode
    assert conn.overload_started("receipt")  # per type
    conn.overload_eased("chat", depth=60, capacity=64)  # room for one, still nearly full
    assert not conn.overload_started("chat")
    conn.overload_eased("chat", depth=20, capacity=64)  # drained: the episode is over
    assert conn.overload_started("chat")


async def test_a_frame_a_full_socket_queue_drops_is_reported_and_the_socket_closed() -> None:
    dropped: list[tuple[str, str]] = []
    conn = Connection(None, "u", None, None, queue_size=2,  # type: ignore[arg-type]
                      implicit_receipt=lambda u, m: None,
                      on_drop=lambda t, r: dropped.append((t, r)))
    for i in range(4):
        conn.send({"type": "signal", "id": str(i)})
    # The first frame that does not fit closes the socket (a slow consumer): later ones
    # are not queued, nor reported again.
    assert dropped == [("signal", "queue_full")]
    assert conn.closed and conn.slow is not None
    await conn.stop()
