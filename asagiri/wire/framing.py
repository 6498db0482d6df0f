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
    """Split a byte stream into frames. Feed it any slicing of the stream, one byte at a time included.

    Each payload is copied exactly once, from the received chunk into a buffer of the announced
    size (allocated only after the size passed the ``max_frame_size`` check); frames are returned
    as ``bytearray`` objects the caller owns.
    """

    __slots__ = ("_prefix", "_frame", "_filled", "_spare", "max_frame_size")

    def __init__(self, *, max_frame_size: int) -> None:
        if not 0 < max_frame_size <= MAX_LENGTH:
            raise ValueError("max_frame_size must be between 1 and 2**32-1")
        self.max_frame_size = max_frame_size
        self._prefix = bytearray()
        self._frame: bytearray | None = None
        self._filled = 0
        self._spare: bytearray | None = None

    def recycle(self, frame: bytearray) -> None:
        """Hand back a frame the caller no longer reads; a next frame of the same size reuses it.

        Tensor chunks all have the same size, so a stream of them stops allocating (and
        zero-filling) a fresh buffer per frame.
        """
        self._spare = frame

    @property
    def buffered(self) -> int:
        return len(self._prefix) + self._filled

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytearray]:
        frames: list[bytearray] = []
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        while pos < end:
            if self._frame is None:
                need = LENGTH_BYTES - len(self._prefix)
                take = min(need, end - pos)
                self._prefix += view[pos : pos + take]
                pos += take
                if len(self._prefix) < LENGTH_BYTES:
                    break
                n = int.from_bytes(self._prefix, "big")
                self._prefix.clear()
                if n > self.max_frame_size:
                    raise RemoteProtocolError(
                        f"peer announced a frame of {n} bytes; the maximum is {self.max_frame_size}"
                    )
                spare, self._spare = self._spare, None
                self._frame = spare if spare is not None and len(spare) == n else bytearray(n)
                self._filled = 0
            frame = self._frame
            take = min(len(frame) - self._filled, end - pos)
            frame[self._filled : self._filled + take] = view[pos : pos + take]
            self._filled += take
            pos += take
            if self._filled == len(frame):
                frames.append(frame)
                self._frame = None
                self._filled = 0
        return frames
