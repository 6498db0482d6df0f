"""The thin anyio layer over the sans-IO handshake and channel: bytes to and from a socket.

Every error that the peer can cause surfaces as ``RemoteProtocolError`` (it broke the protocol)
or ``ConnectionLost`` (it went away); callers close the connection on either.
"""

from __future__ import annotations

from collections import deque

import anyio
import anyio.abc

from .channel import ClientHandshake, SecureChannel, ServerHandshake, SiteRefused, _decode_plain
from .codec import encode
from .crypto import AuthenticationFailed, Identity, PublicIdentity
from .errors import ConnectionLost, RemoteProtocolError
from .framing import FrameDecoder, encode_frame
from .messages import Message, Reject
from .pool import ArrayPool

__all__ = ["Connection", "accept_handshake", "connect_handshake", "probe_handshake"]

_RECV_BYTES = 1 << 20
_HANDSHAKE_FRAME_MAX = 1024
_PEER_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class Connection:
    """An authenticated, encrypted message stream. ``send`` is safe to call from several tasks."""

    def __init__(
        self, stream: anyio.abc.ByteStream, channel: SecureChannel, decoder: FrameDecoder, peer: str
    ) -> None:
        self._stream = stream
        _widen_socket_buffers(stream, 4 * channel.chunk_bytes)
        self._channel = channel
        self._decoder = decoder
        self._send_lock = anyio.Lock()
        # Frames read but not yet decrypted: each is decoded only when a message is asked for, so a
        # limit set after one message (limit_payload) holds for every frame behind it, even frames
        # that came in the same read.
        self._frames: deque[bytearray] = deque()
        self.peer = peer
        self.bytes_sent = 0
        self.bytes_received = 0

    def limit_payload(self, max_bytes: int) -> None:
        """From now on refuse any message whose tensors total more than ``max_bytes``."""
        self._channel.max_payload_bytes = max_bytes

    @property
    def pool(self) -> ArrayPool:
        """Where received tensors come from; release consumed messages' arrays here."""
        return self._channel.pool

    async def send(self, msg: Message) -> None:
        async with self._send_lock:
            try:
                for frame in self._channel.frames(msg):
                    await self._stream.send(frame)
                    self.bytes_sent += len(frame)
            except _PEER_GONE as exc:
                raise ConnectionLost(f"{self.peer}: {exc!r}") from None

    def pending(self, frames: list[bytearray]) -> None:
        """Frames read before this connection existed (the first read after the handshake)."""
        self._frames.extend(frames)

    async def receive(self) -> Message:
        while True:
            while self._frames:
                payload = self._frames.popleft()
                msg = self._channel.receive_frame(payload)
                # receive_frame has decrypted the payload into its destination and kept no reference.
                self._decoder.recycle(payload)
                if msg is not None:
                    return msg
            try:
                data = await self._stream.receive(_RECV_BYTES)
            except _PEER_GONE as exc:
                raise ConnectionLost(f"{self.peer}: {type(exc).__name__}") from None
            self.bytes_received += len(data)
            self._frames.extend(self._decoder.feed(data))

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self._stream.aclose()
            except _PEER_GONE:
                pass


def _widen_socket_buffers(stream: anyio.abc.ByteStream, size: int) -> None:
    """Room for a few chunks in the kernel, so encrypting the next chunk overlaps sending this one."""
    import socket

    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if sock is None:
        return
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, opt) < size:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


async def _send_plain(stream: anyio.abc.ByteStream, payload: bytes) -> None:
    await stream.send(encode_frame(payload, max_frame_size=_HANDSHAKE_FRAME_MAX))


async def _receive_plain(stream: anyio.abc.ByteStream, decoder: FrameDecoder) -> bytes:
    while True:
        try:
            data = await stream.receive(_HANDSHAKE_FRAME_MAX)
        except _PEER_GONE as exc:
            raise ConnectionLost(f"handshake: {type(exc).__name__}") from None
        frames = decoder.feed(data)
        if len(frames) > 1 or (frames and decoder.buffered):
            raise RemoteProtocolError("peer sent data before the handshake finished")
        if frames:
            return bytes(frames[0])


async def probe_handshake(stream: anyio.abc.ByteStream, identity: Identity, site_id: int,
                          coordinator: PublicIdentity) -> None:
    """The site's side of the handshake up to the coordinator's signed reply, then nothing more
    (no session opens): proves the coordinator at the other end holds the pinned key and enrols
    this site (``asagiri check``).  Raises ``SiteRefused``, ``AuthenticationFailed``,
    ``ConnectionLost`` or ``RemoteProtocolError``."""
    hs = ClientHandshake(identity, site_id, coordinator)
    decoder = FrameDecoder(max_frame_size=_HANDSHAKE_FRAME_MAX)
    try:
        await _send_plain(stream, hs.hello())
    except _PEER_GONE as exc:
        raise ConnectionLost(f"handshake: {type(exc).__name__}") from None
    hs.receive(await _receive_plain(stream, decoder))


async def connect_handshake(
    stream: anyio.abc.ByteStream,
    identity: Identity,
    site_id: int,
    coordinator: PublicIdentity,
    *,
    max_frame_size: int,
    max_payload_bytes: int,
    chunk_bytes: int,
) -> Connection:
    """Run the site's side of the handshake. Raises ``SiteRefused`` or ``AuthenticationFailed``."""
    hs = ClientHandshake(identity, site_id, coordinator)
    decoder = FrameDecoder(max_frame_size=_HANDSHAKE_FRAME_MAX)
    try:
        await _send_plain(stream, hs.hello())
        reply = await _receive_plain(stream, decoder)
        await _send_plain(stream, hs.receive(reply))
        # The coordinator answers ClientAuth with an encrypted Welcome, or a plaintext Reject
        # (a plaintext message starts with its 4-byte header length, so its first byte is 0).
        decoder.max_frame_size = max_frame_size
        first: list[bytes] = []
        while not first:
            first = decoder.feed(await stream.receive(_RECV_BYTES))
    except _PEER_GONE as exc:
        raise ConnectionLost(f"handshake: {type(exc).__name__}") from None
    if first[0][:1] == b"\0":
        _decode_plain(bytes(first[0]), Reject)
    assert hs.keys is not None
    channel = SecureChannel(
        hs.keys, max_frame_size=max_frame_size, max_payload_bytes=max_payload_bytes, chunk_bytes=chunk_bytes
    )
    conn = Connection(stream, channel, decoder, peer="coordinator")
    conn.pending(first)  # the Welcome, and whatever came in the same read
    return conn


async def accept_handshake(
    stream: anyio.abc.ByteStream,
    identity: Identity,
    roster: dict[int, PublicIdentity],
    *,
    max_frame_size: int,
    max_payload_bytes: int,
    chunk_bytes: int,
    pool: ArrayPool | None = None,
) -> tuple[int, Connection]:
    """Run the coordinator's side. On refusal, tells the peer why (in the clear) and re-raises.

    ``pool``: where received tensors come from; a coordinator shares one across its sessions so
    that recycled receive buffers stay O(model size), not O(sites x model size).
    """
    hs = ServerHandshake(identity, roster)
    decoder = FrameDecoder(max_frame_size=_HANDSHAKE_FRAME_MAX)
    try:
        hello = await _receive_plain(stream, decoder)
        await _send_plain(stream, hs.receive_hello(hello))
        site_id = hs.receive_auth(await _receive_plain(stream, decoder))
    except (SiteRefused, AuthenticationFailed) as exc:
        reason = str(exc) or "authentication failed"
        try:
            await _send_plain(stream, encode(Reject(reason[:4000])))
        except _PEER_GONE:
            pass
        raise SiteRefused(reason) from None
    except _PEER_GONE as exc:
        raise ConnectionLost(f"handshake: {type(exc).__name__}") from None
    assert hs.keys is not None
    decoder.max_frame_size = max_frame_size
    channel = SecureChannel(
        hs.keys, max_frame_size=max_frame_size, max_payload_bytes=max_payload_bytes, chunk_bytes=chunk_bytes,
        pool=pool,
    )
    return site_id, Connection(stream, channel, decoder, peer=f"site {site_id}")
