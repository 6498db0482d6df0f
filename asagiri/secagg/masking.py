"""Adding and removing masks: pure functions over ring arrays, with pinned seeds for vectors.

A site ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) * PRG(s_uv)`` (mod 2**bits),
with ``sign(u, v) = +1`` if ``u < v`` else ``-1``, so each pairwise mask cancels between two
survivors.  ``s_uv`` is a KDF of the X25519 agreement between the two sites' masking keys and the
round context; ``b_u`` is a fresh random seed.
"""

from __future__ import annotations

import struct

import numpy as np

from ..wire.crypto import EphemeralKey, Keystream, blake2b
from .prg import BLOCK, stream

__all__ = ["add_masks", "add_stream_block", "pair_seed", "round_context", "sign"]


def round_context(run_id: str, rnd: int, attempt: int) -> bytes:
    return run_id.encode() + b"\0" + struct.pack(">II", rnd, attempt)


def sign(u: int, v: int) -> int:
    return 1 if u < v else -1


def pair_seed(my_key: EphemeralKey, peer_public: bytes, u: int, v: int, ctx: bytes) -> bytes:
    """s_uv: identical for (u, v) and (v, u); bound to the round so a replay cannot reuse it."""
    lo, hi = min(u, v), max(u, v)
    return blake2b(my_key.agree(peer_public) + ctx + struct.pack(">II", lo, hi), person=b"asagiri-pair")


def add_masks(
    vector: np.ndarray, self_seed: bytes | None, pair_seeds: list[tuple[int, bytes]], *, scratch: np.ndarray | None = None
) -> np.ndarray:
    """In place: ``vector += PRG(self_seed) + sum(sign * PRG(seed))``; ``sign`` is +1 or -1.

    The unmasking side passes negated signs (a self mask being removed is an entry with sign -1).
    Every stream is consumed block by block into one small buffer, so masking a vector of any
    size allocates nothing large and stays in cache.
    """
    entries = ([(1, self_seed)] if self_seed is not None else []) + list(pair_seeds)
    streams = [(s, stream(seed)) for s, seed in entries]
    if not streams:
        return vector
    flat = vector.reshape(-1)
    b = min(BLOCK, flat.size)
    buf = scratch[:b] if scratch is not None and scratch.size >= b else np.empty(b, dtype=flat.dtype)
    for start in range(0, flat.size, b):
        block = flat[start : start + b]
        add_stream_block(block, streams, buf[: block.size])
    return vector


def add_stream_block(block: np.ndarray, streams: list[tuple[int, Keystream]], buf: np.ndarray) -> None:
    """Add (sign +1) or subtract (-1) each stream's next ``len(block)`` words into ``block``."""
    for sign, ks in streams:
        ks.fill(memoryview(buf))
        if sign > 0:
            block += buf
        else:
            block -= buf
