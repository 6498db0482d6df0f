"""The mask PRG: ChaCha20 keyed by a KDF of a seed, expanded straight into integer arrays.

``expand_into(seed, out)`` fills ``out`` (uint32 or uint64) with the ChaCha20-IETF keystream under
``BLAKE2b-256(seed, person="asagiri-prg")`` and libsodium's fixed DRG nonce: byte-for-byte what
``randombytes_buf_deterministic`` produces for that key (``protocol/vectors/keystream.json``), but
written into the caller's buffer through pyca/cryptography, several times faster.  Never NumPy's
generators: those are predictable.
"""

from __future__ import annotations

import numpy as np

from ..wire.crypto import Keystream, blake2b

__all__ = ["BLOCK", "expand", "expand_into", "prg_key", "stream"]

# Elements processed per step by the block-wise quantiser and masker: small enough to stay in
# cache, large enough that per-call overhead is noise.
BLOCK = 1 << 17


def prg_key(seed: bytes) -> bytes:
    return blake2b(seed, person=b"asagiri-prg")


def stream(seed: bytes) -> Keystream:
    """The PRG of ``seed`` as a resumable stream (element i is bytes [w*i, w*(i+1)) little-endian)."""
    return Keystream(prg_key(seed))


def expand_into(seed: bytes, out: np.ndarray) -> np.ndarray:
    if out.dtype not in (np.uint32, np.uint64) or not out.flags.c_contiguous:
        raise ValueError("masks are C-contiguous uint32 or uint64 arrays")
    stream(seed).fill(memoryview(out.reshape(-1).view(np.uint8)))
    return out


def expand(seed: bytes, length: int, dtype: type = np.uint32) -> np.ndarray:
    return expand_into(seed, np.empty(length, dtype=dtype))
