"""The Bitrix24 channel: ``im.notify.personal.add`` on an incoming-webhook URL.

Wire format (Bitrix24 REST): ``POST <webhook>/im.notify.personal.add.json`` with
``{"USER_ID": <id>, "MESSAGE": <text>}``; success is ``{"result": <notification id>}``,
an error ``{"error": CODE, "error_description": TEXT}`` (HTTP 400/401/403/404/429/5xx).

Requests (readiness pings included) are paced on our side to the cloud limit
(``rate_per_s``, 2 by default, with a configurable ``burst``) per portal by a
``stages.ports.RateGate``, one ``acquire`` per request. The channel is given its gate
(the notification wiring passes the cluster-wide one of ``cluster.ratelimit``); without
one it uses :class:`LocalRateGate`, shared by every channel of this process.
Classification: HTTP 5xx, 429, 503 ``QUERY_LIMIT_EXCEEDED``, ``OVERLOAD_LIMIT``, timeouts
and connection errors are transient; every other error (``USER_ID_EMPTY``, unknown user,
bad webhook) is permanent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from stages.buckets import TokenBuckets
from stages.notifications import Delivery, ResultCallback, SendResult
from stages.ports import RateGate

METHOD = "im.notify.personal.add"
PING_CACHE_S = 5.0  # a readiness verdict is reused this long
TRANSIENT_ERRORS = {"QUERY_LIMIT_EXCEEDED", "OVERLOAD_LIMIT", "INTERNAL_SERVER_ERROR",
                    "ERROR_UNEXPECTED_ANSWER", "PORTAL_DELETED_TEMPORARILY"}


class LocalRateGate:
    """The ``RateGate`` port within one process: a GCRA bucket per key
    (``stages.buckets``). ``acquire`` books the key's next slot, then sleeps until it."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.buckets = TokenBuckets(capacity=max(1, burst), refill=1, interval_s=1.0 / rate)
        self.clock = clock
        self.sleep = sleep

    async def acquire(self, key: str) -> None:
        wait = self.buckets.reserve(key, 1, self.clock())
        if wait > 0:
            await self.sleep(wait)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up: one bucket for every key
    (a ``RateGate`` of its own; tests pace a channel with one)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self._gate = LocalRateGate(rate, burst, clock, sleep)

    @property
    def tokens(self) -> float:
        """Tokens left now (negative: slots booked ahead)."""
        return self._gate.buckets.level("", self._gate.clock())

    async def acquire(self, key: str = "") -> None:
        await self._gate.acquire("")


# One gate per (rate, burst) in this process, whatever channel objects point at it.
_gates: dict[tuple[float, int], LocalRateGate] = {}


def local_gate(rate: float, burst: int) -> LocalRateGate:
    gate = _gates.get((rate, burst))
    if gate is None:
        gate = _gates[(rate, burst)] = LocalRateGate(rate, burst)
    return gate


def portal_key(webhook_url: str) -> str:
    """The gate key of a webhook: its portal (host), whatever user or secret it names."""
    return "bitrix:" + urlsplit(webhook_url).netloc.lower()


def classify(status: int, body: Any) -> SendResult:
    """An HTTP answer of the webhook → our verdict."""
    if isinstance(body, dict) and "result" in body and "error" not in body and status < 400:
        return SendResult.ok(str(body["result"]))
    code = str(body.get("error", "")) if isinstance(body, dict) else ""
    text = str(body.get("error_description", "")) if isinstance(body, dict) else ""
    detail = f"HTTP {status} {code}: {text}".strip()[:500]
    if status >= 500 or status == 429 or code in TRANSIENT_ERRORS:
        return SendResult.transient(detail)
    return SendResult.permanent(detail)


class BitrixChannel:
    kind = "bitrix"

    def __init__(self, webhook_url: str, *, rate_per_s: float = 2.0, burst: int = 2,
                 timeout_s: float = 10.0, client: httpx.AsyncClient | None = None,
                 bucket: TokenBucket | None = None, gate: RateGate | None = None,
                 ping_cache_s: float = PING_CACHE_S) -> None:
        self.base = webhook_url.rstrip("/") + "/"
        self.key = portal_key(webhook_url)
        if gate is None:
            gate = bucket if bucket is not None else local_gate(rate_per_s, burst)
        self.gate = gate
        self.client = client or httpx.AsyncClient(timeout=timeout_s)
        self.ping_cache_s = ping_cache_s
        self._ping: tuple[float, str | None] | None = None  # (when, error or None)
        self._ping_lock = asyncio.Lock()

    def available(self) -> bool:
        return True

    async def _call(self, method: str, payload: dict[str, Any]) -> tuple[int, Any]:
        await self.gate.acquire(self.key)
        resp = await self.client.post(f"{self.base}{method}.json", json=payload)
        try:
            body = resp.json()
        except ValueError:
            body = {"error": "BAD_RESPONSE", "error_description": resp.text[:200]}
        return resp.status_code, body

    async def _send_one(self, d: Delivery) -> SendResult:
        try:
            status, body = await self._call(METHOD, {"USER_ID": d.address, "MESSAGE": d.message})
        except httpx.TimeoutException as exc:
            return SendResult.transient(f"timeout: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            return SendResult.transient(f"{type(exc).__name__}: {exc}"[:500])
        return classify(status, body)

    async def send(self, deliveries: Sequence[Delivery],
                   on_result: ResultCallback | None = None) -> list[SendResult]:
        """One request after another (the portal's rate limit is the bottleneck, not
        latency); each result is reported (``on_result``) before the next request."""
        out: list[SendResult] = []
        for i, d in enumerate(deliveries):
            result = await self._send_one(d)
            out.append(result)
            if on_result is not None:
                await on_result(i, result)
        return out

    async def ping(self) -> None:
        """Readiness: the webhook answers a cheap method (``server.time``). The call goes
        through the channel's rate gate like any other, and its verdict is kept for
        ``ping_cache_s``: however often readiness is probed, the portal sees at most one
        ping per period from this process (concurrent probes share it)."""
        async with self._ping_lock:
            now = time.monotonic()
            if self._ping is None or now - self._ping[0] >= self.ping_cache_s:
                error: str | None = None
                try:
                    status, body = await self._call("server.time", {})
                    if status >= 400 or not isinstance(body, dict) or "error" in body:
                        code = body.get("error") if isinstance(body, dict) else None
                        error = f"bitrix webhook: HTTP {status} {code}"
                except httpx.HTTPError as exc:
                    error = f"bitrix webhook: {type(exc).__name__}: {exc}"[:300]
                self._ping = (time.monotonic(), error)
            error = self._ping[1]
        if error is not None:
            raise RuntimeError(error)

    async def close(self) -> None:
        await self.client.aclose()
