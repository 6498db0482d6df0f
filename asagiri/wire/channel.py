"""Sans-IO mutually authenticated handshake and encrypted channel.

Handshake (three plaintext frames, then encryption), specified in ``protocol/SPEC.md``:

1. site -> coordinator  ``ClientHello(version, site_id, e_c, nonce_c)``
2. coordinator -> site  ``ServerHello(version, e_s, sig_S(H1))``  with
   ``H1 = BLAKE2b("asagiri-hs1", ClientHello || e_s || S_pub)``
3. site -> coordinator  ``ClientAuth(sig_C(H2))`` with ``H2 = BLAKE2b("asagiri-hs2", H1 || C_pub)``

The site pins the coordinator's identity ``S_pub``; the coordinator looks ``site_id`` up in its
roster and verifies the signature with the enrolled key, so a site not in the roster, or one that
cannot prove its key, is refused before anything else is exchanged.  Session keys are libsodium's
``crypto_kx`` keys of the two ephemeral X25519 keys, bound to the transcript by a keyed BLAKE2b
over ``H2``: one key per direction, so a frame reflected back at its sender fails to verify.

After the handshake each frame is ``kind (1 byte) || ChaCha20-Poly1305(counter, payload, aad=kind)``
with a per-direction 64-bit counter as the nonce, never sent: a dropped, replayed, reordered or
tampered frame fails authentication and the channel is closed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from . import codec
from .crypto import (
    AEAD_TAG_BYTES,
    AuthenticationFailed,
    EphemeralKey,
    Identity,
    PublicIdentity,
    SessionKeys,
    StreamCipher,
    blake2b,
    random_bytes,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import LENGTH_BYTES
from .messages import PROTOCOL_VERSION, ClientAuth, ClientHello, Message, Reject, ServerHello
from .pool import ArrayPool

__all__ = [
    "ClientHandshake",
    "FRAME_CHUNK",
    "FRAME_HEADER",
    "SecureChannel",
    "ServerHandshake",
    "SiteRefused",
]

FRAME_HEADER = 0x01  # a message header (msgpack)
FRAME_CHUNK = 0x02  # raw tensor bytes belonging to the pending message


class SiteRefused(Exception):
    """The coordinator refused this site (``Reject``), or the site failed to authenticate."""


def _h1(hello_bytes: bytes, server_eph: bytes, server_pub: bytes) -> bytes:
    return blake2b(hello_bytes + server_eph + server_pub, person=b"asagiri-hs1")


def _h2(h1: bytes, client_pub: bytes) -> bytes:
    return blake2b(h1 + client_pub, person=b"asagiri-hs2")


def _bind(keys: SessionKeys, h2: bytes) -> SessionKeys:
    return SessionKeys(
        rx=blake2b(h2, key=keys.rx, person=b"asagiri-session"),
        tx=blake2b(h2, key=keys.tx, person=b"asagiri-session"),
    )


def _decode_plain(data: bytes, expected: type[Message]) -> Message:
    msg = codec.decode(data, max_payload_bytes=0)
    if isinstance(msg, Reject):
        raise SiteRefused(msg.reason)
    if not isinstance(msg, expected):
        raise RemoteProtocolError(f"expected {expected.__name__} during the handshake, got {type(msg).__name__}")
    return msg


class ClientHandshake:
    """The site's side. ``hello()`` -> send; ``receive(server_hello)`` -> send ClientAuth; then ``keys``."""

    def __init__(
        self,
        identity: Identity,
        site_id: int,
        coordinator: PublicIdentity,
        *,
        ephemeral: EphemeralKey | None = None,
        nonce: bytes | None = None,
    ) -> None:
        self._identity = identity
        self._coordinator = coordinator
        self._eph = ephemeral or EphemeralKey.generate()
        self._hello = codec.encode(
            ClientHello(PROTOCOL_VERSION, site_id, self._eph.public, nonce or random_bytes(16))
        )
        self.keys: SessionKeys | None = None

    def hello(self) -> bytes:
        return self._hello

    def receive(self, data: bytes) -> bytes:
        if self.keys is not None:
            raise LocalProtocolError("handshake already complete")
        msg = _decode_plain(data, ServerHello)
        assert isinstance(msg, ServerHello)
        if msg.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"coordinator speaks protocol version {msg.version}")
        h1 = _h1(self._hello, msg.ephemeral_key, self._coordinator.raw)
        self._coordinator.verify(b"asagiri server" + h1, msg.signature)
        h2 = _h2(h1, self._identity.public.raw)
        self.keys = _bind(self._eph.session_keys(msg.ephemeral_key, initiator=True), h2)
        return codec.encode(ClientAuth(self._identity.sign(b"asagiri client" + h2)))


class ServerHandshake:
    """The coordinator's side. ``receive_hello`` -> send ServerHello (or Reject); ``receive_auth``."""

    def __init__(
        self,
        identity: Identity,
        roster: Mapping[int, PublicIdentity],
        *,
        ephemeral: EphemeralKey | None = None,
    ) -> None:
        self._identity = identity
        self._roster = roster
        self._eph = ephemeral or EphemeralKey.generate()
        self._h1: bytes | None = None
        self._client_eph: bytes | None = None
        self.site_id: int | None = None
        self.keys: SessionKeys | None = None

    def receive_hello(self, data: bytes) -> bytes:
        msg = _decode_plain(data, ClientHello)
        assert isinstance(msg, ClientHello)
        if msg.version != PROTOCOL_VERSION:
            raise SiteRefused(f"protocol version {msg.version} is not supported (this is {PROTOCOL_VERSION})")
        if msg.site_id not in self._roster:
            raise SiteRefused(f"site {msg.site_id} is not enrolled in this federation")
        self.site_id = msg.site_id
        self._client_eph = msg.ephemeral_key
        self._h1 = _h1(data, self._eph.public, self._identity.public.raw)
        return codec.encode(
            ServerHello(PROTOCOL_VERSION, self._eph.public, self._identity.sign(b"asagiri server" + self._h1))
        )

    def receive_auth(self, data: bytes) -> int:
        if self._h1 is None or self.site_id is None or self._client_eph is None:
            raise LocalProtocolError("receive_hello first")
        msg = _decode_plain(data, ClientAuth)
        assert isinstance(msg, ClientAuth)
        enrolled = self._roster[self.site_id]
        h2 = _h2(self._h1, enrolled.raw)
        try:
            enrolled.verify(b"asagiri client" + h2, msg.signature)
        except AuthenticationFailed:
            raise SiteRefused(f"site {self.site_id} could not prove its enrolled identity key") from None
        self.keys = _bind(self._eph.session_keys(self._client_eph, initiator=False), h2)
        return self.site_id


@dataclass(slots=True)
class _Inbound:
    pending: codec.PendingMessage
    arrays: list[np.ndarray]
    views: list[memoryview]
    index: int = 0
    offset: int = 0


class SecureChannel:
    """Encrypt and decrypt frames for one established session (sans-IO).

    ``frames(msg)`` yields ready-to-send wire frames (length prefix included); tensors are cut into
    ``chunk_bytes`` pieces encrypted straight from the array's memory.  ``chunk_bytes`` is a sending
    choice only: the receiver takes any chunking whose chunks stay within one tensor.  ``receive_frame(payload)``
    takes one frame payload and returns a :class:`Message` once a whole message has arrived;
    tensor chunks are decrypted directly into arrays taken from ``pool`` when the header arrives.
    Hand a consumed message's arrays back with ``pool.release`` to make the next one allocation-free.
    """

    def __init__(
        self,
        keys: SessionKeys,
        *,
        max_frame_size: int,
        max_payload_bytes: int,
        chunk_bytes: int,
        pool: ArrayPool | None = None,
    ) -> None:
        if chunk_bytes + 1 + AEAD_TAG_BYTES > max_frame_size:
            raise ValueError("chunk_bytes must leave room for the frame kind and the tag")
        self._tx = StreamCipher(keys.tx)
        self._rx = StreamCipher(keys.rx)
        self._tx_counter = 0
        self._rx_counter = 0
        self.max_frame_size = max_frame_size
        self.max_payload_bytes = max_payload_bytes
        self.chunk_bytes = chunk_bytes
        self._inbound: _Inbound | None = None
        self.pool = pool if pool is not None else ArrayPool()
        self.broken = False

    # -- sending ---------------------------------------------------------------------------------

    def _seal_frame(self, kind: int, plaintext: bytes | memoryview) -> bytearray:
        n = 1 + len(plaintext) + AEAD_TAG_BYTES
        if n > self.max_frame_size:
            raise LocalProtocolError(f"frame of {n} bytes exceeds the maximum {self.max_frame_size}")
        out = bytearray(LENGTH_BYTES + n)
        out[:LENGTH_BYTES] = n.to_bytes(LENGTH_BYTES, "big")
        out[LENGTH_BYTES] = kind
        with memoryview(out) as view:
            self._tx.seal_into(self._tx_counter, plaintext, bytes([kind]), view[LENGTH_BYTES + 1 :])
        self._tx_counter += 1
        return out

    def frames(self, msg: Message) -> Iterator[bytearray]:
        header, arrays = codec.encode_header(msg)
        yield self._seal_frame(FRAME_HEADER, header)
        step = self.chunk_bytes
        for arr in arrays:
            flat = memoryview(arr.reshape(-1).view(np.uint8))
            for pos in range(0, len(flat), step):
                yield self._seal_frame(FRAME_CHUNK, flat[pos : pos + step])

    # -- receiving -------------------------------------------------------------------------------

    def receive_frame(self, payload: bytes) -> Message | None:
        if self.broken:
            raise RemoteProtocolError("channel already failed")
        try:
            return self._receive_frame(payload)
        except (RemoteProtocolError, AuthenticationFailed) as exc:
            self.broken = True
            if isinstance(exc, AuthenticationFailed):
                raise RemoteProtocolError("frame failed authentication (tampered, replayed or reordered)") from None
            raise

    def _receive_frame(self, payload: bytes) -> Message | None:
        if len(payload) < 1 + AEAD_TAG_BYTES:
            raise RemoteProtocolError("frame too short")
        kind = payload[0]
        body = memoryview(payload)[1:]
        counter = self._rx_counter
        if kind == FRAME_HEADER:
            if self._inbound is not None:
                raise RemoteProtocolError("message header while tensor data was pending")
            header = self._rx.open(counter, bytes(body), bytes([kind]))
            self._rx_counter += 1
            pending = codec.decode_header(header, max_payload_bytes=self.max_payload_bytes)
            arrays = pending.allocate(self.pool)
            if pending.payload_bytes == 0:
                return pending.finish(arrays)
            views = [memoryview(a.reshape(-1).view(np.uint8)) for a in arrays]
            self._inbound = _Inbound(pending, arrays, views)
            self._skip_empty()
            return None
        if kind == FRAME_CHUNK:
            inbound = self._inbound
            if inbound is None:
                raise RemoteProtocolError("tensor data without a message header")
            n = len(body) - AEAD_TAG_BYTES
            target = inbound.views[inbound.index]
            remaining = len(target) - inbound.offset
            # The sender's chunk size is its own choice (SPEC §4): any chunk of 1..remaining bytes
            # of the current tensor is accepted; the frame limit already bounds it from above.
            if not 0 < n <= remaining:
                raise RemoteProtocolError(f"tensor chunk of {n} bytes; 1 to {remaining} were due")
            self._rx.open_into(counter, body, bytes([kind]), target[inbound.offset : inbound.offset + n])
            self._rx_counter += 1
            inbound.offset += n
            if inbound.offset == len(target):
                inbound.index += 1
                inbound.offset = 0
                self._skip_empty()
            if inbound.index == len(inbound.views):
                self._inbound = None
                return inbound.pending.finish(inbound.arrays)
            return None
        raise RemoteProtocolError(f"unknown frame kind {kind}")

    def _skip_empty(self) -> None:
        inbound = self._inbound
        assert inbound is not None
        while inbound.index < len(inbound.views) and len(inbound.views[inbound.index]) == 0:
            inbound.index += 1
