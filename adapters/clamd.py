"""ClamAV's clamd over its INSTREAM protocol (TCP host:port or a unix socket).

The file is streamed: ``zINSTREAM\\0``, then chunks each prefixed with their length as a
4-byte big-endian integer, then a zero length. clamd answers one NUL-terminated line:
``stream: OK``, ``stream: <signature> FOUND``, or ``... ERROR`` (``INSTREAM size limit
exceeded. ERROR`` when the stream is over its ``StreamMaxLength``; clamd may close the
socket right after saying so, while we are still writing).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncGenerator, AsyncIterable

from stages.ports import ScanLimitExceeded

MAX_CHUNK = 64 * 1024  # clamd reads chunks up to StreamMaxLength; keep them modest


class ClamdError(RuntimeError):
    """clamd answered with an error other than the size limit."""


class ClamdScanner:
    """``stages.ports.VirusScanner`` on clamd."""

    def __init__(self, address: str, timeout_s: float = 20.0) -> None:
        self.address = address
        self.timeout_s = timeout_s

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if ":" in self.address and not self.address.startswith("/"):
            host, port = self.address.rsplit(":", 1)
            return await asyncio.open_connection(host, int(port))
        return await asyncio.open_unix_connection(self.address)

    async def ping(self) -> None:
        """Raises unless clamd answers PONG."""
        async with asyncio.timeout(min(self.timeout_s, 5.0)):
            reader, writer = await self._open()
            try:
                writer.write(b"zPING\0")
                await writer.drain()
                reply = (await reader.readuntil(b"\0")).rstrip(b"\0")
            finally:
                writer.close()
        if reply != b"PONG":
            raise ClamdError(f"clamd: unexpected PING reply {reply!r}")

    async def scan(self, chunks: AsyncIterable[bytes] | bytes) -> str | None:
        """None if clean, else the signature name. Raises ``ScanLimitExceeded`` when clamd
        refuses the stream as too large, ``ClamdError`` on another clamd error, and
        OSError/TimeoutError when clamd cannot be reached or is too slow."""
        async with asyncio.timeout(self.timeout_s):
            reader, writer = await self._open()
            try:
                reply = await self._instream(reader, writer, chunks)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        return self._parse(reply)

    async def _instream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        chunks: AsyncIterable[bytes] | bytes) -> str:
        # Read the answer while writing: clamd answers early (and closes) on an error.
        answer = asyncio.ensure_future(reader.readuntil(b"\0"))
        try:
            writer.write(b"zINSTREAM\0")
            try:
                async with contextlib.aclosing(_pieces(chunks)) as pieces:
                    async for piece in pieces:
                        if answer.done():
                            break
                        writer.write(struct.pack("!L", len(piece)) + piece)
                        await writer.drain()
                    else:
                        writer.write(struct.pack("!L", 0))
                        await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                pass  # clamd stopped reading: its answer says why (or it closed silently)
            try:
                raw = await answer
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise ClamdError("clamd closed the connection without an answer") from None
                raw = exc.partial
            except ConnectionResetError:
                raise ClamdError("clamd reset the connection without an answer") from None
        finally:
            if not answer.done():
                answer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await answer
        return raw.rstrip(b"\0").decode(errors="replace").strip()

    @staticmethod
    def _parse(reply: str) -> str | None:
        # "stream: OK" | "stream: Eicar-Signature FOUND" | "... ERROR"
        if reply.endswith("ERROR"):
            if "size limit exceeded" in reply:
                raise ScanLimitExceeded(reply.removesuffix("ERROR").strip().rstrip("."))
            raise ClamdError(f"clamd: {reply}")
        if reply.endswith("FOUND"):
            return reply.split(":", 1)[-1].strip().removesuffix("FOUND").strip()
        if reply.endswith("OK"):
            return None
        raise ClamdError(f"clamd: unexpected answer {reply!r}")


async def _pieces(chunks: AsyncIterable[bytes] | bytes) -> AsyncGenerator[bytes, None]:
    """The stream cut to at most MAX_CHUNK bytes per INSTREAM chunk (no empty chunk: a
    zero length ends the stream). Closes the source when done or abandoned."""
    if isinstance(chunks, bytes | bytearray):
        for i in range(0, len(chunks), MAX_CHUNK):
            yield bytes(chunks[i:i + MAX_CHUNK])
        return
    try:
        async for chunk in chunks:
            for i in range(0, len(chunk), MAX_CHUNK):
                yield bytes(chunk[i:i + MAX_CHUNK])
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
