"""ClamAV's clamd over its INSTREAM protocol (TCP host:port or a unix socket)."""

from __future__ import annotations

import asyncio
import struct


class ClamdScanner:
    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if ":" in self.address and not self.address.startswith("/"):
            host, port = self.address.rsplit(":", 1)
            return await asyncio.open_connection(host, int(port))
        return await asyncio.open_unix_connection(self.address)

    async def scan(self, data: bytes) -> str | None:
        """None if clean, else the signature name. Raises if clamd cannot be reached."""
        async with asyncio.timeout(self.timeout_s):
            reader, writer = await self._open()
            try:
                writer.write(b"zINSTREAM\0")
                for i in range(0, len(data), 65536):
                    chunk = data[i:i + 65536]
                    writer.write(struct.pack("!L", len(chunk)) + chunk)
                writer.write(struct.pack("!L", 0))
                await writer.drain()
                reply = (await reader.readuntil(b"\0")).rstrip(b"\0").decode()
            finally:
                writer.close()
        # "stream: OK" | "stream: Eicar-Signature FOUND" | "... ERROR"
        if reply.endswith("OK"):
            return None
        if reply.endswith("FOUND"):
            return reply.split(":", 1)[1].strip().removesuffix("FOUND").strip()
        raise RuntimeError(f"clamd: {reply}")
