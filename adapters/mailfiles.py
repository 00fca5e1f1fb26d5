"""The embedded default e-mail channel: each e-mail is written as an ``.eml`` file.

One file per (notification, contact), written atomically (temp file + rename), so a
resend after a crash replaces the file instead of adding a second one. Files are written
one at a time; each result is reported (``on_result``) before the next file is written.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from adapters.mail import build_email
from stages.notifications import Delivery, ResultCallback, SendResult


class MailDirChannel:
    kind = "email"

    def __init__(self, directory: Path, mail_from: str, subject: str) -> None:
        self.directory = Path(directory)
        self.mail_from = mail_from
        self.subject = subject

    def available(self) -> bool:
        return True

    def _write(self, d: Delivery) -> SendResult:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{d.notification_id}-{d.contact_index}.eml"
        path = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        try:
            tmp.write_bytes(bytes(build_email(d, self.mail_from, self.subject)))
            os.replace(tmp, path)
            return SendResult.ok(name)
        except OSError as exc:  # a full or read-only disk may recover
            return SendResult.transient(f"cannot write {name}: {exc}")

    async def send(self, deliveries: Sequence[Delivery],
                   on_result: ResultCallback | None = None) -> list[SendResult]:
        out: list[SendResult] = []
        for i, d in enumerate(deliveries):
            result = await asyncio.to_thread(self._write, d)
            out.append(result)
            if on_result is not None:
                await on_result(i, result)
        return out

    def _probe(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        probe = self.directory / f".ready-{os.getpid()}.tmp"
        try:
            probe.write_bytes(b"ok")
        finally:
            probe.unlink(missing_ok=True)

    async def ping(self) -> None:
        """Readiness: the folder exists (or can be made) and a file can be written in it."""
        await asyncio.to_thread(self._probe)
