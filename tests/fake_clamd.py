"""A stand-in for ClamAV's clamd that speaks its real wire protocol over TCP.

Commands are prefixed ``z`` (NUL-terminated) or ``n`` (newline-terminated), as clamd reads
them. ``PING`` → ``PONG``; ``VERSION`` → a version line; ``INSTREAM`` reads chunks, each
a 4-byte big-endian length then that many bytes, until a zero length, and answers
``stream: OK``, ``stream: Eicar-Signature FOUND`` when the stream holds the EICAR test
string, or — as soon as the stream passes ``max_stream`` bytes (clamd's
``StreamMaxLength``) — ``INSTREAM size limit exceeded. ERROR`` and closes the connection.
Anything else: ``UNKNOWN COMMAND``. Every scan is recorded (sizes of the chunks received).
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

# The EICAR anti-virus test file, assembled so this source is not itself flagged.
EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!" + b"$H+H*")


@dataclass
class Scan:
    chunks: list[int] = field(default_factory=list)
    reply: str = ""

    @property
    def size(self) -> int:
        return sum(self.chunks)


class FakeClamd:
    def __init__(self, max_stream: int = 25 * 1024 * 1024) -> None:
        self.max_stream = max_stream
        self.scans: list[Scan] = []
        self.pings = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FakeClamd:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            prefix = await reader.readexactly(1)
            if prefix not in (b"z", b"n"):
                return
            end = b"\0" if prefix == b"z" else b"\n"
            command = (await reader.readuntil(end))[:-1]

            def reply(text: str) -> None:
                writer.write(text.encode() + end)

            if command == b"PING":
                self.pings += 1
                reply("PONG")
            elif command == b"VERSION":
                reply("ClamAV 1.4.1/27500/Fake")
            elif command == b"INSTREAM":
                await self._instream(reader, reply)
            else:
                reply("UNKNOWN COMMAND")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _instream(self, reader: asyncio.StreamReader, reply: Callable[[str], None]
                        ) -> None:
        scan = Scan()
        self.scans.append(scan)
        data = bytearray()
        while True:
            (length,) = struct.unpack("!L", await reader.readexactly(4))
            if length == 0:
                break
            if scan.size + length > self.max_stream:
                scan.reply = "INSTREAM size limit exceeded. ERROR"
                reply(scan.reply)
                return
            data += await reader.readexactly(length)
            scan.chunks.append(length)
        scan.reply = "stream: Eicar-Signature FOUND" if EICAR in data else "stream: OK"
        reply(scan.reply)


class ThreadedFakeClamd:
    """The fake on its own event loop in a thread, for servers in other processes."""

    def __init__(self, max_stream: int = 25 * 1024 * 1024) -> None:
        self.clamd = FakeClamd(max_stream)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fake-clamd")

    def start(self) -> ThreadedFakeClamd:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.clamd.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.clamd.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def address(self) -> str:
        return self.clamd.address
