"""The e-mail channel over SMTP (aiosmtplib) with a small pool of connections.

A batch is spread over up to ``pool_size`` connections, each sending its share one
message after another; connections stay open between batches and are reopened when the
server drops them (a share whose connection cannot be opened fails transiently as a whole,
without a connection attempt per message). Classification: SMTP 4xx replies, timeouts
and connection errors are transient; 5xx replies (unknown mailbox, policy refusal) are permanent.

At most ``pool_size`` messages are in flight per channel at any instant, across all the
batches sent concurrently (the dispatcher's two loops share one channel): a message holds
one of ``pool_size`` slots from its transaction's start until ``on_result`` for it has
returned. So with a caller that records each result in ``on_result``, at most
``pool_size`` e-mails can have reached the server without their result being recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiosmtplib

from adapters.mail import build_email
from stages.notifications import Delivery, ResultCallback, SendResult

log = logging.getLogger("conveyor.smtp")


def _stop_if_cancelled() -> None:
    """Raises ``CancelledError`` when this task was asked to stop. A cancellation that
    arrives just as the server's reply does can be swallowed on its way through
    ``asyncio.wait_for`` (aiosmtplib's reply wait, Python 3.11): the lane must not go on to
    its next message then, or a stopped dispatcher would keep sending."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def classify_code(code: int, text: str) -> SendResult:
    detail = f"{code} {text}".strip()[:500]
    if 400 <= code < 500:
        return SendResult.transient(detail)
    return SendResult.permanent(detail)


class SmtpChannel:
    kind = "email"

    def __init__(self, host: str, port: int = 25, *, mail_from: str, subject: str,
                 username: str | None = None, password: str | None = None,
                 use_tls: bool = False, start_tls: bool = False, timeout_s: float = 10.0,
                 pool_size: int = 2) -> None:
        self.host = host
        self.port = port
        self.mail_from = mail_from
        self.subject = subject
        self.username = username
        self.password = password
        self.use_tls = use_tls
        self.start_tls = start_tls
        self.timeout_s = timeout_s
        self.pool_size = max(1, pool_size)
        self._idle: list[aiosmtplib.SMTP] = []
        # One slot per message in flight, held until its result is reported.
        self._slots = asyncio.Semaphore(self.pool_size)
        self.connects = 0  # how many connections were opened (observable reuse)
        self.connect_attempts = 0  # how many were tried, failed ones included

    def available(self) -> bool:
        return True

    def _client(self) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout_s,
                               use_tls=self.use_tls, start_tls=self.start_tls or None,
                               username=self.username, password=self.password,
                               validate_certs=self.use_tls or self.start_tls)

    async def _acquire(self) -> aiosmtplib.SMTP:
        while self._idle:
            smtp = self._idle.pop()
            if smtp.is_connected:
                return smtp
        smtp = self._client()
        self.connect_attempts += 1
        await smtp.connect()
        self.connects += 1
        return smtp

    async def _discard(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            smtp.close()
        except Exception:  # already gone
            pass

    async def _send_share(self, share: list[tuple[int, Delivery]], out: list[SendResult | None],
                          on_result: ResultCallback | None) -> None:
        """Sends a share over one connection, one message after another; each message
        holds a slot until its result is reported. When a connection cannot be opened, the
        rest of the share is transient at once: one failed connect per share, not per
        message (each may take ``timeout_s``)."""
        smtp: aiosmtplib.SMTP | None = None
        unsent: list[tuple[int, Delivery]] = []
        try:
            for pos, (idx, d) in enumerate(share):
                _stop_if_cancelled()
                async with self._slots:
                    if smtp is None:
                        try:
                            smtp = await self._acquire()
                        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                            failed = SendResult.transient(f"connect: {type(exc).__name__}: {exc}"[:500])
                            unsent = share[pos:]
                            for rest, _ in unsent:
                                out[rest] = failed
                            break
                    out[idx] = result = await self._send_one(smtp, d)
                    if on_result is not None:
                        await on_result(idx, result)
                if not smtp.is_connected:
                    smtp = None
        finally:
            if smtp is not None and smtp.is_connected and len(self._idle) < self.pool_size:
                self._idle.append(smtp)
            elif smtp is not None:
                await self._discard(smtp)
        if on_result is not None:
            for rest, _ in unsent:
                failure = out[rest]
                assert failure is not None
                await on_result(rest, failure)

    async def _send_one(self, smtp: aiosmtplib.SMTP, d: Delivery) -> SendResult:
        msg = build_email(d, self.mail_from, self.subject)
        try:
            _, response = await smtp.send_message(msg)
            return SendResult.ok(response[:200] if isinstance(response, str) else None)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            result = classify_code(first.code, first.message)
        except aiosmtplib.SMTPResponseException as exc:
            result = classify_code(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self._discard(smtp)
            return SendResult.transient(f"{type(exc).__name__}: {exc}"[:500])
        # The transaction failed on a reply: reset it so the connection can be reused.
        try:
            await smtp.rset()
        except Exception:
            await self._discard(smtp)
        return result

    async def send(self, deliveries: Sequence[Delivery],
                   on_result: ResultCallback | None = None) -> list[SendResult]:
        """Up to ``pool_size`` lanes; each reports a message's result through ``on_result``
        before its next message starts (see the module's note on messages in flight)."""
        out: list[SendResult | None] = [None] * len(deliveries)
        indexed = list(enumerate(deliveries))
        lanes = min(self.pool_size, len(indexed))
        shares = [indexed[i::lanes] for i in range(lanes)]
        await asyncio.gather(*(self._send_share(s, out, on_result) for s in shares))
        return [r if r is not None else SendResult.transient("not attempted") for r in out]

    async def ping(self) -> None:
        """Readiness: a fresh connection answers NOOP."""
        smtp = self._client()
        await smtp.connect()
        try:
            await smtp.noop()
        finally:
            try:
                await smtp.quit()
            except Exception:
                smtp.close()

    async def close(self) -> None:
        while self._idle:
            smtp = self._idle.pop()
            try:
                await smtp.quit()
            except Exception:
                smtp.close()
