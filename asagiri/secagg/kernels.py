"""Compiled inner loops of quantisation and masking (numba), one pass over cache-resident blocks.

NumPy needs about ten passes per block for clip, count, scale, add noise, floor, convert and add
each mask, and those passes were most of a site's masking time.  These kernels do the same
arithmetic in one or two passes.  They are pure functions of their arrays; the keystream bytes
come from the PRG (``prg.py``), never from here.  ``tests/secagg/test_kernels.py`` checks them
against a plain NumPy reference, bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["add_streams", "quantize_block", "warm"]


@njit(cache=True, nogil=True, boundscheck=False)
def quantize_block(src, clip, factor, noise, out):  # type: ignore[no-untyped-def]  # pragma: no cover
    """``out[i] = floor(clip(src[i]) * factor + noise[i] / 2**16)`` in two's complement.

    ``src`` float32, ``clip`` float32 (clipping happens at the update's own precision), ``factor``
    float64, ``noise`` uint16, ``out`` the ring type.  The plan guarantees |value| < 2**(bits-1), so
    the int64 -> ring conversion is exact.  Returns (values changed by clipping, NaN values); a NaN
    is written as 0 and the caller refuses the update.
    """
    clipped = 0
    nan = 0
    lo = -clip
    for i in range(src.size):
        x = src[i]
        if x != x:
            nan += 1
            x = np.float32(0.0)
        c = x
        if c > clip:
            c = clip
        elif c < lo:
            c = lo
        clipped += c != x
        out[i] = np.int64(np.floor(np.float64(c) * factor + np.float64(noise[i]) * (1.0 / 65536.0)))
    return clipped, nan


@njit(cache=True, nogil=True, boundscheck=False)
def add_streams(out, words, nplus):  # type: ignore[no-untyped-def]  # pragma: no cover
    """``out += words[0] + ... + words[nplus-1] - words[nplus] - ...`` modulo the ring size."""
    n = out.size
    for j in range(words.shape[0]):
        w = words[j]
        if j < nplus:
            for i in range(n):
                out[i] += w[i]
        else:
            for i in range(n):
                out[i] -= w[i]


def warm(bits: int) -> None:
    """Load (or compile) both kernels for a ring of ``bits`` before a round needs them.  The first
    call costs about a second of CPU; a site makes it while it sets up, so it never falls inside
    a stage's deadline."""
    ring = np.uint32 if bits == 32 else np.uint64
    out = np.zeros(1, dtype=ring)
    quantize_block(np.zeros(1, np.float32), np.float32(1.0), 1.0, np.zeros(1, np.uint16), out)
    add_streams(out, np.zeros((1, 1), dtype=ring), 1)
