"""Length-prefixed framing: ``u32 big-endian length || payload``.

The decoder is sans-IO (bytes in, frames out) and refuses a frame whose announced length exceeds
``max_frame_size`` as soon as the 4-byte prefix is seen, before buffering or allocating for it
(h11's ``max_incomplete_event_size``).
"""

from __future__ import annotations

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["FrameDecoder", "LENGTH_BYTES", "encode_frame"]

LENGTH_BYTES = 4
MAX_LENGTH = (1 << 32) - 1


def encode_frame(payload: bytes | bytearray | memoryview, *, max_frame_size: int) -> bytes:
    n = len(payload)
    if n > max_frame_size:
        raise LocalProtocolError(f"frame of {n} bytes exceeds the maximum {max_frame_size}")
    return n.to_bytes(LENGTH_BYTES, "big") + bytes(payload)


class FrameDecoder:
    """Split a byte stream into frames. Feed it any slicing of the stream, one byte at a time included."""

    __slots__ = ("_buf", "max_frame_size")

    def __init__(self, *, max_frame_size: int) -> None:
        if not 0 < max_frame_size <= MAX_LENGTH:
            raise ValueError("max_frame_size must be between 1 and 2**32-1")
        self.max_frame_size = max_frame_size
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        while len(buf) >= LENGTH_BYTES:
            n = int.from_bytes(buf[:LENGTH_BYTES], "big")
            if n > self.max_frame_size:
                raise RemoteProtocolError(
                    f"peer announced a frame of {n} bytes; the maximum is {self.max_frame_size}"
                )
            end = LENGTH_BYTES + n
            if len(buf) < end:
                break
            with memoryview(buf) as view:
                frames.append(bytes(view[LENGTH_BYTES:end]))
            del buf[:end]
        return frames
