"""Adding and removing masks: pure functions over ring arrays, with pinned seeds for vectors.

A site ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) * PRG(s_uv)`` (mod 2**bits),
with ``sign(u, v) = +1`` if ``u < v`` else ``-1``, so each pairwise mask cancels between two
survivors.  ``s_uv`` is a KDF of the X25519 agreement between the two sites' masking keys and the
round context ``ctx`` (``binding.RoundParams.context``); ``b_u`` is a fresh random seed.
"""

from __future__ import annotations

import struct
import threading

import numpy as np

from ..wire.crypto import EphemeralKey, Keystream, blake2b
from .kernels import add_streams
from .prg import BLOCK, DEFAULT_PRG, Prg, stream

__all__ = ["StreamAdder", "add_masks", "pair_seed", "scratch", "sign"]


def sign(u: int, v: int) -> int:
    return 1 if u < v else -1


def pair_seed(my_key: EphemeralKey, peer_public: bytes, u: int, v: int, ctx: bytes) -> bytes:
    """s_uv: identical for (u, v) and (v, u); bound to the round so a replay cannot reuse it."""
    lo, hi = min(u, v), max(u, v)
    return blake2b(my_key.agree(peer_public) + ctx + struct.pack(">II", lo, hi), person=b"asagiri-pair")


def add_masks(
    vector: np.ndarray,
    self_seed: bytes | None,
    pair_seeds: list[tuple[int, bytes]],
    *,
    prg: Prg = DEFAULT_PRG,
) -> np.ndarray:
    """In place: ``vector += PRG(self_seed) + sum(sign * PRG(seed))``; ``sign`` is +1 or -1.

    The unmasking side passes negated signs (a self mask being removed is an entry with sign -1).
    Every stream is consumed block by block into one small buffer, so masking a vector of any
    size allocates nothing large and stays in cache.
    """
    entries = ([(1, self_seed)] if self_seed is not None else []) + list(pair_seeds)
    if not entries:
        return vector
    flat = vector.reshape(-1)
    adder = StreamAdder([(s, stream(seed, prg)) for s, seed in entries], flat.dtype)
    for start in range(0, flat.size, BLOCK):
        adder.add(flat[start : start + BLOCK])
    return vector


_SCRATCH = threading.local()


def scratch(dtype: np.dtype | type, size: int) -> np.ndarray:
    """A reusable per-thread buffer of at least ``size`` elements (contents undefined).

    Fresh buffers cost page faults on first touch (about 0.5 ms per MB on our VMs); masking a round
    used to fault in ~12 MB of scratch this way.  Callers fill a buffer and consume it before
    returning control, so sharing one per thread and dtype is safe.
    """
    cache: dict[np.dtype, np.ndarray] = _SCRATCH.__dict__.setdefault("buffers", {})
    key = np.dtype(dtype)
    buf = cache.get(key)
    if buf is None or buf.size < size:
        buf = cache[key] = np.empty(size, dtype=key)
    return buf[:size]


class StreamAdder:
    """Adds (sign +1) or subtracts (-1) the next words of several streams into successive blocks.

    Streams are taken ``GROUP`` at a time: their words for one block land in one small scratch
    array and a compiled kernel adds them in a single sweep, so the block stays in cache.
    """

    GROUP = 4

    def __init__(self, streams: list[tuple[int, Keystream]], dtype: np.dtype) -> None:
        # Plus streams first: the kernel adds rows [0, nplus) and subtracts the rest.
        ordered = sorted(streams, key=lambda e: e[0] < 0)
        self._groups = [ordered[i : i + self.GROUP] for i in range(0, len(ordered), self.GROUP)]
        self._scratch = scratch(dtype, min(self.GROUP, len(ordered)) * BLOCK)

    def add(self, block: np.ndarray) -> None:
        n = block.size
        if n > BLOCK:
            raise ValueError(f"blocks are at most {BLOCK} elements")
        for group in self._groups:
            words = self._scratch[: len(group) * n].reshape(len(group), n)
            for row, (_, ks) in zip(words, group, strict=True):
                ks.fill(memoryview(row))
            add_streams(block, words, sum(1 for s, _ in group if s > 0))
