"""Soak: a long open-loop chat load at a fraction of capacity, memory and latency sampled.

    python -m bench.soak --spawn                       # 10 minutes at 70 % of capacity
    python -m bench.soak --spawn --duration 120 --rate 300
    python -m bench.soak --url http://127.0.0.1:8000 --data-dir DIR --rate 100

With ``--spawn`` it starts a local Ray, an embedded PostgreSQL and Serve (``bench/chat.py``'s
``Spawned``), measures capacity first (the closed-loop chat benchmark, 20 in flight per
sender) unless ``--rate`` is given, then offers ``--fraction`` of it for ``--duration``
seconds: ``--pairs`` sender/receiver pairs, each message sent at its scheduled time whatever
the server does (``bench/chat.py``'s open loop), after ``--warmup`` seconds of the same load
that are not sampled. Every ``--sample-s`` seconds it records
the resident memory of each Conveyor process of that Ray (Serve replicas of the app, the
proxy, the state actors; found under the raylet this process started) and the delivery and
ack latency percentiles of the messages of that window.

Judgments (each in the report with its figures; exit status 1 when one fails):

- ``memory``: after the first ``--warmup-fraction`` of the samples, a least-squares line
  through each process's RSS; the growth it predicts over the run must stay within
  ``max(--rss-abs-mb, --rss-rel × mean RSS)``;
- ``p99``: the delivery p99 of the last third of the windows at most ``--p99-ratio`` × that
  of the first third (or within ``--p99-abs-ms`` of it: small figures are noisy);
- ``lost``: every accepted message was delivered.

``--url`` soaks a running application (tokens minted with the dev key under ``--data-dir``;
its credit settings must allow the rate); memory is then not sampled (its processes
are not this one's). Output: one JSON report on stdout (and ``--out FILE``); progress on
stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse
import asyncio
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

from bench.chat import (
    Spawned,
    Target,
    _receiver,
    _sender,
    dev_tokens,
    log,
    open_pairs,
    percentiles,
    run_chat,
    stdout_to_stderr,
)

# Ray actor classes of Conveyor's own state (cluster/), and Serve's proxy.
STATE_ACTORS = ("ConnectionHub", "CreditShard", "DedupShard", "Telemetry", "RateLimiter",
                "ProxyActor")


@dataclass
class Judge:
    """Tolerances of the judgments (see the module's docstring)."""

    warmup_fraction: float = 0.2
    rss_abs_mb: float = 24.0
    rss_rel: float = 0.10
    p99_ratio: float = 2.0
    p99_abs_ms: float = 50.0


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mb: dict[str, float]  # process label -> resident MiB
    delivered: int  # messages delivered in this window
    delivery_ms: dict[str, float | None]
    ack_ms: dict[str, float | None]
    latencies: list[float] = field(default_factory=list)  # this window's delivery seconds


# --- which processes -----------------------------------------------------------------------
def local_raylet_pid() -> int | None:
    """The raylet of the Ray this process started or joined on this machine (None when
    this process holds no Ray node)."""
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        if node is None:
            return None
        return int(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    except Exception:
        return None


def conveyor_processes(raylet_pid: int, app: str) -> dict[str, int]:
    """Label -> pid of the processes of application ``app`` under ``raylet_pid``: its Serve
    replicas (``Gateway``, ``stages`` …), the Serve proxy and Conveyor's state actors.
    Labels carry the pid, since a deployment may have several replicas."""
    out: dict[str, int] = {}
    try:
        children = psutil.Process(raylet_pid).children(recursive=True)
    except psutil.Error:
        return out
    for proc in children:
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if not cmd.startswith("ray::"):
            continue
        name = cmd[5:].split(" ", 1)[0].split(".", 1)[0]  # "Class.method" while one runs
        if name.startswith(f"ServeReplica:{app}:"):
            label = name.rsplit(":", 1)[1]
        elif name in STATE_ACTORS:
            label = name
        else:
            continue
        out[f"{label}:{proc.pid}"] = proc.pid
    return out


def rss_mb(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for label, pid in pids.items():
        try:
            out[label] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        except psutil.Error:
            continue  # gone meanwhile
    return out


# --- the run -------------------------------------------------------------------------------
async def soak(target: Target, rate: float, duration_s: float, *, pairs: int = 10,
               sample_s: float = 5.0, processes: Callable[[], dict[str, int]] | None = None,
               settle_s: float = 30.0, warmup_s: float = 0.0) -> dict[str, Any]:
    """Offer ``rate`` messages/s in total over ``pairs`` chats for ``warmup_s`` (not
    sampled: pools, caches and lazy imports settle) then ``duration_s``, sampling every
    ``sample_s``; returns the samples and the run's totals (not yet judged)."""
    ps, receivers, senders = await open_pairs(target, pairs, "s")
    per_pair = max(1, math.ceil(rate * (warmup_s + duration_s) / pairs))
    settled, all_settled = [asyncio.Event() for _ in ps], asyncio.Event()
    done = [asyncio.Event() for _ in ps]
    receiving = [asyncio.create_task(_receiver(p, c, 0.05, all_settled, d))
                 for p, c, d in zip(ps, receivers, done, strict=True)]
    sending = [asyncio.create_task(_sender(p, c, per_pair, 1, "", s, pairs / rate))
               for p, c, s in zip(ps, senders, settled, strict=True)]
    samples: list[Sample] = []
    await asyncio.sleep(warmup_s)
    seen_d = [len(p.delivery_latency) for p in ps]
    seen_a = [len(p.ack_latency) for p in ps]
    t0 = time.monotonic()

    def take() -> Sample:
        window: list[float] = []
        acks: list[float] = []
        for i, p in enumerate(ps):
            window += p.delivery_latency[seen_d[i]:]
            acks += p.ack_latency[seen_a[i]:]
            seen_d[i], seen_a[i] = len(p.delivery_latency), len(p.ack_latency)
        return Sample(round(time.monotonic() - t0, 1), rss_mb(processes()) if processes else {},
                      len(window), percentiles(window), percentiles(acks), window)

    try:
        while time.monotonic() - t0 < duration_s:
            await asyncio.sleep(min(sample_s, max(0.0, duration_s - (time.monotonic() - t0))))
            samples.append(take())
            s = samples[-1]
            log(f"t={s.t:.0f}s delivered {s.delivered} p99 {s.delivery_ms['p99']} ms, "
                f"RSS {sum(s.rss_mb.values()):.0f} MiB")
        try:
            async with asyncio.timeout(settle_s):
                await asyncio.gather(*(e.wait() for e in settled))
                all_settled.set()
                await asyncio.gather(*(d.wait() for d in done))
        except TimeoutError:
            log(f"not settled {settle_s:.0f} s after the load")
    finally:
        for t in [*sending, *receiving]:
            t.cancel()
        await asyncio.gather(*sending, *receiving, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in [*senders, *receivers]), return_exceptions=True)
    accepted = sum(p.accepted for p in ps)
    lost = sum(len(p.accepted_ids - p.delivered_ids) for p in ps)
    return {"rate": rate, "durationS": duration_s, "warmupS": warmup_s, "pairs": pairs,
            "sampleS": sample_s,
            "sent": sum(p.sent for p in ps), "accepted": accepted,
            "rejected": sum(sum(p.rejections.values()) for p in ps), "lost": lost,
            "deliveredPerS": round(sum(len(p.delivered_ids) for p in ps)
                                   / max(warmup_s + duration_s, 1e-9), 1),
            "samples": samples}


# --- the judgments -------------------------------------------------------------------------
def growth_mb(points: list[tuple[float, float]]) -> float:
    """The growth over the span of ``points`` (t, MiB) that a least-squares line predicts."""
    if len(points) < 3:
        return 0.0
    ts, ys = zip(*points, strict=True)
    if max(ts) == min(ts):
        return 0.0
    slope = statistics.linear_regression(ts, ys).slope
    return round(slope * (max(ts) - min(ts)), 1)


def judge_memory(samples: list[Sample], j: Judge) -> dict[str, Any]:
    """Per process: its fitted growth after the warm-up, its allowance, and whether it held."""
    kept = samples[int(len(samples) * j.warmup_fraction):]
    labels = sorted({label for s in kept for label in s.rss_mb})
    per: dict[str, Any] = {}
    for label in labels:
        pts = [(s.t, s.rss_mb[label]) for s in kept if label in s.rss_mb]
        if len(pts) < 3:
            continue  # a replica that came or went mid-run: too short a series to judge
        mean = statistics.fmean(y for _, y in pts)
        allow = round(max(j.rss_abs_mb, j.rss_rel * mean), 1)
        grew = growth_mb(pts)
        per[label] = {"meanMb": round(mean, 1), "growthMb": grew, "allowedMb": allow,
                      "ok": grew <= allow}
    total = [(s.t, sum(s.rss_mb.values())) for s in kept]
    return {"ok": bool(per) and all(v["ok"] for v in per.values()), "processes": per,
            "totalGrowthMb": growth_mb(total), "judged": len(per)}


def judge_p99(samples: list[Sample], j: Judge) -> dict[str, Any]:
    """Delivery p99 of the last third of the windows against that of the first third."""
    third = max(1, len(samples) // 3)
    first = percentiles(x for s in samples[:third] for x in s.latencies)["p99"]
    last = percentiles(x for s in samples[-third:] for x in s.latencies)["p99"]
    if first is None or last is None:
        return {"ok": False, "firstThirdMs": first, "lastThirdMs": last, "why": "no deliveries"}
    ok = last <= first * j.p99_ratio or last - first <= j.p99_abs_ms
    return {"ok": ok, "firstThirdMs": first, "lastThirdMs": last,
            "ratio": round(last / first, 2) if first else None}


def judge(run: dict[str, Any], j: Judge, memory: bool = True) -> dict[str, Any]:
    """The report: the run's figures, every sample (without raw latencies) and verdicts."""
    samples: list[Sample] = run["samples"]
    verdicts: dict[str, Any] = {"p99": judge_p99(samples, j),
                                "lost": {"ok": run["lost"] == 0 and run["accepted"] > 0,
                                         "lost": run["lost"], "accepted": run["accepted"]}}
    if memory:
        verdicts["memory"] = judge_memory(samples, j)
    return {**{k: v for k, v in run.items() if k != "samples"},
            "judge": j.__dict__, "verdicts": verdicts,
            "ok": all(v["ok"] for v in verdicts.values()),
            "samples": [{"t": s.t, "delivered": s.delivered, "deliveryMs": s.delivery_ms,
                         "ackMs": s.ack_ms, "rssMb": s.rss_mb} for s in samples]}


# --- command line --------------------------------------------------------------------------
async def capacity(target: Target, pairs: int) -> float:
    """Delivered msgs/s of the closed-loop chat benchmark (20 in flight per sender)."""
    run = await run_chat(target, pairs, 200, 20, timeout_s=120.0)
    return float(run.summary()["msgsPerS"])


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    j = Judge(args.warmup_fraction, args.rss_abs_mb, args.rss_rel, args.p99_ratio, args.p99_abs_ms)
    if args.url:
        from settings import Settings

        url = args.url.rstrip("/")
        ws = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/ws"
        target = Target("url", url, ws, dev_tokens(args.data_dir or Settings().data_dir))
        if args.rate is None:
            args.rate = args.fraction * await capacity(target, args.pairs)
        return judge(await soak(target, args.rate, args.duration, pairs=args.pairs,
                                sample_s=args.sample_s, warmup_s=args.warmup), j, memory=False)
    with Spawned(args.gateways, args.cpu, shared=args.shared_machine) as env:
        target = env.deploy_conveyor()
        measured = None
        if args.rate is None:
            measured = await capacity(target, args.pairs)
            args.rate = round(args.fraction * measured, 1)
            log(f"capacity {measured} msg/s: soaking at {args.rate} msg/s")
        raylet = local_raylet_pid()
        assert raylet is not None, "the spawned Ray has no raylet in this process"
        run = await soak(target, args.rate, args.duration, pairs=args.pairs,
                         sample_s=args.sample_s, warmup_s=args.warmup,
                         processes=lambda: conveyor_processes(raylet, "bench"))
        report = judge(run, j)
        report["capacityMsgsPerS"] = measured
        return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--spawn", action="store_true", help="start a local Ray, PostgreSQL and Serve")
    where.add_argument("--url", help="a running application, e.g. http://127.0.0.1:8000")
    p.add_argument("--data-dir", type=Path, default=None, help="with --url: the app's data dir")
    p.add_argument("--duration", type=float, default=600.0,
                   help="seconds of sampled load (default 600)")
    p.add_argument("--warmup", type=float, default=30.0,
                   help="seconds of the same load before sampling starts (default 30)")
    p.add_argument("--rate", type=float, default=None,
                   help="messages/s in total (default: --fraction of the measured capacity)")
    p.add_argument("--fraction", type=float, default=0.7, help="of capacity, without --rate")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--gateways", type=int, default=1, help="gateway replicas (--spawn)")
    p.add_argument("--cpu", type=float, default=0.1, help="num_cpus per replica (--spawn)")
    p.add_argument("--warmup-fraction", type=float, default=Judge.warmup_fraction)
    p.add_argument("--rss-abs-mb", type=float, default=Judge.rss_abs_mb)
    p.add_argument("--rss-rel", type=float, default=Judge.rss_rel)
    p.add_argument("--p99-ratio", type=float, default=Judge.p99_ratio)
    p.add_argument("--p99-abs-ms", type=float, default=Judge.p99_abs_ms)
    p.add_argument("--shared-machine", action="store_true",
                   help="run even while another Ray runs on this machine (--spawn; noisier)")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stdout_to_stderr() as real_stdout:
        report = asyncio.run(_main(args))
        text = orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n"
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_bytes(text)
        os.write(real_stdout, text)
    raise SystemExit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
