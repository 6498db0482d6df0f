"""The only module that touches cryptographic primitives (our "hazmat" boundary).

Primitives come from PyNaCl (libsodium): Ed25519 identities, X25519 key agreement, the
libsodium ``crypto_kx`` session-key derivation, BLAKE2b.  The bulk AEAD of the channel is the
RFC 8439 ChaCha20-Poly1305 construction; we call it through pyca/cryptography because that
binding can encrypt from and decrypt into caller-owned buffers (``encrypt_into`` /
``decrypt_into``), which is what lets a 44 MB tensor cross the channel without intermediate
copies.  ``tests/wire/test_crypto.py`` checks both libraries produce identical bytes.

Nothing here invents a cipher, MAC, key exchange or RNG.  Every authentication failure is the
one opaque :class:`AuthenticationFailed` (as Fernet's ``InvalidToken``).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3 as _blake3
import nacl.bindings as _sodium
import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "AEAD_TAG_BYTES",
    "AuthenticationFailed",
    "EphemeralKey",
    "Identity",
    "PublicIdentity",
    "SessionKeys",
    "KEYSTREAMS",
    "Keystream",
    "StreamCipher",
    "blake2b",
    "blake2b_chunks",
    "blake3_chunks",
    "chacha20_keystream_into",
    "counter_nonce",
    "random_bytes",
]

AEAD_TAG_BYTES = 16
KEY_BYTES = 32


class AuthenticationFailed(Exception):
    """A signature, MAC or peer identity did not verify.  Deliberately says no more."""


def random_bytes(n: int) -> bytes:
    """Bytes from libsodium's CSPRNG."""
    return _sodium.randombytes(n)


def blake2b(data: bytes, *, person: bytes = b"", key: bytes = b"", size: int = 32) -> bytes:
    """BLAKE2b with optional personalisation (domain separation, zero-padded to 16 bytes) and key.

    Python's ``hashlib`` BLAKE2b, the RFC 7693 function libsodium's ``crypto_generichash`` also
    computes (``tests/wire/test_crypto.py`` checks they agree): called a few hundred times per
    secure round, and PyNaCl's argument checks cost 40 us a call against 1 us here.
    """
    return hashlib.blake2b(data, digest_size=size, key=key, person=person[:16]).digest()


def blake2b_chunks(chunks: Iterable[bytes | memoryview], *, person: bytes = b"", size: int = 32) -> bytes:
    """:func:`blake2b` of the concatenation of ``chunks``, without building it (for whole models)."""
    h = hashlib.blake2b(digest_size=size, person=person[:16])
    for chunk in chunks:
        h.update(chunk)
    return h.digest()


def blake3_chunks(chunks: Iterable[bytes | memoryview], *, domain: bytes) -> bytes:
    """BLAKE3-256 of ``domain || 0x00 || chunks...``: for hashing a model-sized vector per round,
    where BLAKE2b's 5 ms per 4 MB was as much as a site's masking (the ``blake3`` package, the
    BLAKE3 team's own bindings)."""
    h = _blake3.blake3(domain + b"\0")
    for chunk in chunks:
        h.update(chunk)
    return h.digest()


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """A peer's long-term Ed25519 verify key (what the roster and the sites pin)."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            raise ValueError("an Ed25519 public key is exactly 32 bytes")

    @classmethod
    def from_hex(cls, text: str) -> PublicIdentity:
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError as exc:
            raise ValueError("public key is not hexadecimal") from exc
        return cls(raw)

    def hex(self) -> str:
        return self.raw.hex()

    def fingerprint(self) -> str:
        return blake2b(self.raw, person=b"asagiri-fpr", size=8).hex()

    def verify(self, message: bytes, signature: bytes) -> None:
        try:
            nacl.signing.VerifyKey(self.raw).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError) as exc:
            raise AuthenticationFailed() from exc


class Identity:
    """A long-term Ed25519 signing key."""

    __slots__ = ("_signing",)

    def __init__(self, signing: nacl.signing.SigningKey) -> None:
        self._signing = signing

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is exactly 32 bytes")
        return cls(nacl.signing.SigningKey(seed))

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read a key file written by :meth:`save`; refuses files others can read."""
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(f"{path}: private key is readable by others (mode {oct(mode & 0o777)})")
        text = path.read_text().strip()
        try:
            return cls.from_seed(bytes.fromhex(text))
        except ValueError as exc:
            raise ValueError(f"{path}: not an Asagiri identity key file") from exc

    def save(self, path: Path) -> None:
        """Write the seed as hex with mode 0600, created with that mode (never world-readable)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.seed().hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def seed(self) -> bytes:
        return bytes(self._signing)

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(bytes(self._signing.verify_key))

    def sign(self, message: bytes) -> bytes:
        return self._signing.sign(message).signature


class EphemeralKey:
    """An X25519 key pair used once (a handshake, or one secure-aggregation round)."""

    __slots__ = ("public", "_secret")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise ValueError("an X25519 secret key is exactly 32 bytes")
        self._secret = secret
        self.public = _sodium.crypto_scalarmult_base(secret)

    @classmethod
    def generate(cls) -> EphemeralKey:
        return cls(random_bytes(32))

    def secret_bytes(self) -> bytes:
        return self._secret

    def agree(self, peer_public: bytes) -> bytes:
        """Raw X25519 shared point; refuses low-order peer keys (all-zero output)."""
        if len(peer_public) != 32:
            raise AuthenticationFailed()
        try:
            return _sodium.crypto_scalarmult(self._secret, peer_public)
        except nacl.exceptions.RuntimeError as exc:
            raise AuthenticationFailed() from exc

    def session_keys(self, peer_public: bytes, *, initiator: bool) -> SessionKeys:
        """libsodium ``crypto_kx``: one key per direction, so a frame can never be reflected."""
        if len(peer_public) != 32:
            raise AuthenticationFailed()
        try:
            if initiator:
                rx, tx = _sodium.crypto_kx_client_session_keys(self.public, self._secret, peer_public)
            else:
                rx, tx = _sodium.crypto_kx_server_session_keys(self.public, self._secret, peer_public)
        except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError) as exc:
            raise AuthenticationFailed() from exc
        return SessionKeys(rx=rx, tx=tx)


@dataclass(frozen=True, slots=True)
class SessionKeys:
    rx: bytes
    tx: bytes


def counter_nonce(counter: int) -> bytes:
    """96-bit IETF nonce: 4 zero bytes then the 64-bit little-endian frame counter."""
    return b"\0\0\0\0" + counter.to_bytes(8, "little")


class StreamCipher:
    """ChaCha20-Poly1305 (RFC 8439) for one direction, nonces from a counter we never reuse."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("a ChaCha20-Poly1305 key is exactly 32 bytes")
        self._aead = ChaCha20Poly1305(key)

    def seal_into(self, counter: int, plaintext: memoryview | bytes, aad: bytes, out: memoryview) -> int:
        """Encrypt ``plaintext`` into ``out`` (len(plaintext) + 16 bytes); returns bytes written."""
        n = len(plaintext) + AEAD_TAG_BYTES
        self._aead.encrypt_into(counter_nonce(counter), plaintext, aad, out[:n])
        return n

    def seal(self, counter: int, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(counter_nonce(counter), plaintext, aad)

    def open_into(self, counter: int, ciphertext: memoryview | bytes, aad: bytes, out: memoryview) -> None:
        """Verify and decrypt straight into ``out``; on failure ``out`` holds garbage and must be discarded."""
        try:
            self._aead.decrypt_into(counter_nonce(counter), ciphertext, aad, out)
        except (InvalidTag, ValueError) as exc:
            raise AuthenticationFailed() from exc

    def open(self, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(counter_nonce(counter), ciphertext, aad)
        except (InvalidTag, ValueError) as exc:
            raise AuthenticationFailed() from exc


SODIUM_DRG_NONCE = b"LibsodiumDRG"


# Read-only zeros that every keystream encrypts from: one buffer, however many streams are open
# (the coordinator holds one per survivor while it removes self masks).
_ZEROS = memoryview(bytes(1 << 20))


KEYSTREAMS = ("aes128-ctr", "chacha20")


class Keystream:
    """A resumable keystream: successive ``fill`` calls continue where the last ended.

    ``chacha20``: ChaCha20-IETF under a 32-byte key.  With the default nonce the bytes equal
    libsodium's ``randombytes_buf_deterministic`` for the same key (the fixed nonce
    "LibsodiumDRG"); ``protocol/vectors/keystream.json`` pins both.

    ``aes128-ctr``: AES-128 in counter mode under a 16-byte key, the 128-bit counter block
    starting at zero (the PRG of Google's SecAgg implementation).  With AES-NI it runs about 1.8x
    faster than ChaCha20 on this project's machines; each key must be used for one stream only,
    which the callers guarantee by deriving a fresh key per seed.

    Both produce the bytes in the caller's buffer: filling block by block lets mask code stay
    in cache instead of allocating whole-vector buffers.
    """

    __slots__ = ("_enc",)

    def __init__(self, key: bytes, *, algorithm: str = "chacha20", nonce: bytes = SODIUM_DRG_NONCE) -> None:
        if algorithm == "chacha20":
            if len(key) != KEY_BYTES:
                raise ValueError("a ChaCha20 key is exactly 32 bytes")
            if len(nonce) != 12:
                raise ValueError("an IETF ChaCha20 nonce is exactly 12 bytes")
            # cryptography's ChaCha20 takes a 16-byte nonce: 4-byte little-endian block counter + 12 bytes.
            self._enc = Cipher(algorithms.ChaCha20(key, b"\0\0\0\0" + nonce), mode=None).encryptor()
        elif algorithm == "aes128-ctr":
            if len(key) != 16:
                raise ValueError("an AES-128 key is exactly 16 bytes")
            self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        else:
            raise ValueError(f"unknown keystream {algorithm!r}; known: {', '.join(KEYSTREAMS)}")

    def fill(self, out: memoryview) -> None:
        """Write the next ``len(out)`` bytes of keystream into ``out`` (any item type, counted in bytes)."""
        view = memoryview(out).cast("B")
        total = len(view)
        step = len(_ZEROS)
        for pos in range(0, total, step):
            n = min(step, total - pos)
            # Encrypting zeros yields the keystream.
            self._enc.update_into(_ZEROS[:n], view[pos : pos + n])


def chacha20_keystream_into(key: bytes, out: memoryview, *, nonce: bytes = SODIUM_DRG_NONCE) -> None:
    """Fill ``out`` with the keystream for ``key`` from its start (see :class:`Keystream`)."""
    Keystream(key, nonce=nonce).fill(out)
