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
import socket
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
            sock = await self._connect()
            try:
                reply = await self._instream(sock, chunks)
            finally:
                sock.close()
        return self._parse(reply)

    async def _connect(self) -> socket.socket:
        """A non-blocking socket connected to clamd. The scan talks to the socket itself,
        not through asyncio's streams: a stream's transport closes the socket on the first
        failed write, dropping an answer clamd had already sent (see ``_instream``)."""
        loop = asyncio.get_running_loop()
        if ":" in self.address and not self.address.startswith("/"):
            host, port = self.address.rsplit(":", 1)
            family, kind, proto, _, addr = (await loop.getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM))[0]
            sock = socket.socket(family, kind, proto)
        else:
            sock, addr = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), self.address
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _instream(self, sock: socket.socket, chunks: AsyncIterable[bytes] | bytes) -> str:
        """Streams the chunks while reading the answer: clamd answers early on an error
        (the size limit) and closes, with our chunks unread, so our next write fails.
        The answer it sent before is still in the socket's receive queue, and is read
        from there after the failed write."""
        loop = asyncio.get_running_loop()
        answer = loop.create_task(_read_answer(sock))
        try:
            try:
                await loop.sock_sendall(sock, b"zINSTREAM\0")
                async with contextlib.aclosing(_pieces(chunks)) as pieces:
                    async for piece in pieces:
                        if answer.done():
                            break
                        await loop.sock_sendall(sock, struct.pack("!L", len(piece)) + piece)
                    else:
                        await loop.sock_sendall(sock, struct.pack("!L", 0))
            except (ConnectionResetError, BrokenPipeError):
                pass  # clamd stopped reading: its answer says why (or it closed silently)
            raw = await answer
        finally:
            if not answer.done():
                answer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await answer
        return raw.decode(errors="replace").strip()

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


async def _read_answer(sock: socket.socket) -> bytes:
    """clamd's NUL-terminated answer (without the NUL); what came before a close or reset
    when it ends early; ``ClamdError`` when nothing came."""
    loop = asyncio.get_running_loop()
    data = b""
    while b"\0" not in data:
        try:
            piece = await loop.sock_recv(sock, 4096)
        except ConnectionResetError:
            piece = b""
            if not data:
                raise ClamdError("clamd reset the connection without an answer") from None
        if not piece:
            if not data:
                raise ClamdError("clamd closed the connection without an answer")
            return data
        data += piece
    return data[:data.index(b"\0")]


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
