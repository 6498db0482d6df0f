"""A pair of connected byte streams in one process, standing in for a TCP connection.

A federation run in memory (``asagiri.local``) goes through exactly the code of one run over
TCP: the same handshake, the same encrypted channel and codec, the same sessions on both sides.
Only the socket is replaced, by two bounded anyio memory object streams of byte strings.
"""

from __future__ import annotations

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["MemoryByteStream", "memory_stream_pair"]


class MemoryByteStream(anyio.abc.ByteStream):
    """One end: ``send`` hands the bytes (copied) to the other end's ``receive``."""

    def __init__(self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]) -> None:
        self._send = send
        self._receive = receive
        self._pending = b""

    async def send(self, item: bytes) -> None:
        if item:
            try:
                await self._send.send(bytes(item))
            except anyio.ClosedResourceError:
                raise anyio.BrokenResourceError from None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._pending:
            self._pending = await self._receive.receive()  # EndOfStream once the other end closed
        out, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return out

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def memory_stream_pair(capacity: int = 64) -> tuple[MemoryByteStream, MemoryByteStream]:
    """Two connected ends; each direction buffers up to ``capacity`` sends."""
    a_send, b_receive = anyio.create_memory_object_stream[bytes](capacity)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](capacity)
    return MemoryByteStream(a_send, a_receive), MemoryByteStream(b_send, b_receive)
