"""adapters/clamd.py against a fake clamd speaking clamd's wire protocol over TCP."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest

from adapters.clamd import MAX_CHUNK, ClamdError, ClamdScanner
from stages.ports import ScanLimitExceeded
from tests.conftest import free_port
from tests.fake_clamd import EICAR, FakeClamd


@pytest.fixture
async def clamd() -> AsyncIterator[FakeClamd]:
    server = await FakeClamd(max_stream=1024 * 1024).start()
    yield server
    await server.stop()


class Source:
    """An object streamed in pieces, as ObjectStore.chunks yields it."""

    def __init__(self, data: bytes, piece: int) -> None:
        self.data = data
        self.piece = piece
        self.pulled = 0
        self.closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            for i in range(0, len(self.data), self.piece):
                self.pulled += 1
                yield self.data[i:i + self.piece]
        finally:
            self.closed = True


async def test_the_fake_speaks_clamds_wire_protocol(clamd: FakeClamd) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", clamd.port)
    writer.write(b"zINSTREAM\0" + struct.pack("!L", 5) + b"hello" + struct.pack("!L", 0))
    assert await reader.readuntil(b"\0") == b"stream: OK\0"
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", clamd.port)
    writer.write(b"nPING\n")
    assert await reader.readuntil(b"\n") == b"PONG\n"
    writer.close()


async def test_a_clean_stream_is_sent_in_bounded_chunks(clamd: FakeClamd) -> None:
    data = bytes(range(256)) * 1200  # 300 KiB
    source = Source(data, 100 * 1024)
    assert await ClamdScanner(clamd.address).scan(source.chunks()) is None
    (scan,) = clamd.scans
    assert scan.reply == "stream: OK" and scan.size == len(data)
    assert len(scan.chunks) > 1 and max(scan.chunks) <= MAX_CHUNK
    assert source.closed


async def test_eicar_is_found_with_its_signature_name(clamd: FakeClamd) -> None:
    source = Source(b"harmless prefix " + EICAR + b" suffix", 7)  # split across chunks
    assert await ClamdScanner(clamd.address).scan(source.chunks()) == "Eicar-Signature"
    assert await ClamdScanner(clamd.address).scan(EICAR) == "Eicar-Signature"  # bytes too


async def test_clamds_size_limit_is_a_clear_refusal(clamd: FakeClamd) -> None:
    source = Source(bytes(4 * 1024 * 1024), 256 * 1024)  # 4 MiB against a 1 MiB limit
    with pytest.raises(ScanLimitExceeded, match="size limit exceeded"):
        await ClamdScanner(clamd.address).scan(source.chunks())
    assert clamd.scans[-1].reply == "INSTREAM size limit exceeded. ERROR"
    assert clamd.scans[-1].size <= 1024 * 1024
    assert source.closed  # the object's stream is released, not left open


async def test_an_unreachable_clamd_raises_and_is_never_taken_for_clean() -> None:
    with pytest.raises(OSError):
        await ClamdScanner(f"127.0.0.1:{free_port()}").scan(b"data")
    with pytest.raises(OSError):
        await ClamdScanner("/nonexistent/clamd.sock").scan(b"data")


async def test_a_clamd_that_hangs_up_without_an_answer_is_an_error() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(10)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ClamdError, match="without an answer"):
            await ClamdScanner(f"127.0.0.1:{port}").scan(b"x" * 10)
    finally:
        server.close()
        await server.wait_closed()


async def test_ping(clamd: FakeClamd) -> None:
    await ClamdScanner(clamd.address).ping()
    assert clamd.pings == 1
