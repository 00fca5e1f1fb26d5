"""``/health/live`` and ``/health/ready``: readiness checks every dependency at once,
with a 5 s bound each, and answers 503 with per-dependency detail when one is down.

Soft checks are dependencies the system works without (the event bus, the chat cache):
their detail is shown (``degraded`` when one is down or failing) and readiness stays 200."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from deployments.http import json_response

Check = Callable[[], Awaitable[Any]]
SoftCheck = Callable[[], Awaitable[Mapping[str, Any]]]


class HealthApi:
    def __init__(self, checks: Callable[[], Mapping[str, Check]],
                 soft: Callable[[], Mapping[str, SoftCheck]] | None = None) -> None:
        self.checks = checks  # read at each request: deployments may add theirs later
        self.soft = soft or (lambda: {})

    def routes(self) -> list[BaseRoute]:
        return [Route("/health/live", self.live, methods=["GET"]),
                Route("/health/ready", self.ready, methods=["GET"])]

    async def live(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        results: dict[str, dict[str, Any]] = {}

        async def check(name: str, probe: Check) -> None:
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(probe(), 5.0)
                results[name] = {"status": "up",
                                 "latencyMs": round((time.monotonic() - t0) * 1000, 1)}
            except Exception as exc:
                results[name] = {"status": "down", "error": repr(exc)[:200]}

        async def soft_check(name: str, probe: SoftCheck) -> None:
            try:
                detail = dict(await asyncio.wait_for(probe(), 5.0))
            except Exception as exc:
                detail = {"status": "degraded", "error": repr(exc)[:200]}
            detail.setdefault("status", "up")
            soft_results[name] = detail

        soft_results: dict[str, dict[str, Any]] = {}
        await asyncio.gather(*(check(n, c) for n, c in self.checks().items()),
                             *(soft_check(n, c) for n, c in self.soft().items()))
        ok = all(c["status"] == "up" for c in results.values())
        results.update(soft_results)
        return json_response({"status": "ready" if ok else "unavailable",
                              "checks": dict(sorted(results.items()))}, 200 if ok else 503)
