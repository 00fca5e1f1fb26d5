"""The embedded default e-mail channel: each e-mail is written as an ``.eml`` file.

One file per (notification, contact), written atomically (temp file + rename), so a
resend after a crash replaces the file instead of adding a second one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from adapters.mail import build_email
from stages.notifications import Delivery, SendResult


class MailDirChannel:
    kind = "email"

    def __init__(self, directory: Path, mail_from: str, subject: str) -> None:
        self.directory = Path(directory)
        self.mail_from = mail_from
        self.subject = subject

    def available(self) -> bool:
        return True

    def _write(self, deliveries: Sequence[Delivery]) -> list[SendResult]:
        self.directory.mkdir(parents=True, exist_ok=True)
        out: list[SendResult] = []
        for d in deliveries:
            name = f"{d.notification_id}-{d.contact_index}.eml"
            path = self.directory / name
            tmp = self.directory / f".{name}.tmp"
            try:
                tmp.write_bytes(bytes(build_email(d, self.mail_from, self.subject)))
                os.replace(tmp, path)
                out.append(SendResult.ok(name))
            except OSError as exc:  # a full or read-only disk may recover
                out.append(SendResult.transient(f"cannot write {name}: {exc}"))
        return out

    async def send(self, deliveries: Sequence[Delivery]) -> list[SendResult]:
        return await asyncio.to_thread(self._write, deliveries)

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
