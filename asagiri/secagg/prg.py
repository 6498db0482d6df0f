"""The mask PRG: a stream cipher keyed by a KDF of a seed, expanded straight into integer arrays.

Two PRGs, chosen per federation (``secagg.prg``) and announced in ``SecAggStart``:

- ``aes128-ctr`` (the default): AES-128-CTR under ``BLAKE2b-128(seed, person="asagiri-prg-aes")``
  with the counter block starting at zero.  AES-NI makes it about 1.8x faster than ChaCha20 here.
- ``chacha20``: ChaCha20-IETF under ``BLAKE2b-256(seed, person="asagiri-prg")`` with libsodium's
  fixed DRG nonce: byte-for-byte what ``randombytes_buf_deterministic`` produces for that key
  (``protocol/vectors/keystream.json``), for hardware without AES instructions.

Both are written into the caller's buffer through pyca/cryptography.  Never NumPy's generators:
those are predictable.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from ..wire.crypto import Keystream, blake2b

__all__ = ["BLOCK", "DEFAULT_PRG", "PRGS", "Prg", "expand", "expand_into", "prg_key", "stream"]

# The names fed.yaml's ``secagg.prg`` takes (tests/test_config.py holds the two lists together).
Prg = Literal["aes128-ctr", "chacha20"]
PRGS: tuple[Prg, ...] = get_args(Prg)
DEFAULT_PRG: Prg = "aes128-ctr"

# Elements processed per step by the block-wise quantiser and masker: small enough that a few
# streams' words stay in cache, large enough that per-call overhead is noise.
BLOCK = 1 << 16


def prg_key(seed: bytes, prg: Prg = DEFAULT_PRG) -> bytes:
    if prg == "chacha20":
        return blake2b(seed, person=b"asagiri-prg")
    if prg == "aes128-ctr":
        return blake2b(seed, person=b"asagiri-prg-aes", size=16)
    raise ValueError(f"unknown PRG {prg!r}; known: {', '.join(PRGS)}")


def stream(seed: bytes, prg: Prg = DEFAULT_PRG) -> Keystream:
    """The PRG of ``seed`` as a resumable stream (element i is bytes [w*i, w*(i+1)) little-endian)."""
    return Keystream(prg_key(seed, prg), algorithm=prg)


def expand_into(seed: bytes, out: np.ndarray, prg: Prg = DEFAULT_PRG) -> np.ndarray:
    if out.dtype not in (np.uint32, np.uint64) or not out.flags.c_contiguous:
        raise ValueError("masks are C-contiguous uint32 or uint64 arrays")
    stream(seed, prg).fill(memoryview(out.reshape(-1).view(np.uint8)))
    return out


def expand(seed: bytes, length: int, dtype: type = np.uint32, prg: Prg = DEFAULT_PRG) -> np.ndarray:
    return expand_into(seed, np.empty(length, dtype=dtype), prg)
