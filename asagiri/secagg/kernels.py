"""Compiled inner loops (numba): quantisation and masking, one pass over cache-resident blocks,
and the verified sum's projection (``verify.py``).

NumPy needs about ten passes per block for clip, count, scale, add noise, floor, convert and add
each mask, and those passes were most of a site's masking time.  These kernels do the same
arithmetic in one or two passes.  They are pure functions of their arrays; the keystream bytes
come from the PRG (``prg.py``), never from here.  ``tests/secagg/test_kernels.py`` checks them
against a plain NumPy reference, bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["add_streams", "project_narrow", "project_wide", "quantize_block", "warm"]


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


@njit(cache=True, nogil=True, boundscheck=False)
def project_narrow(xs, u, v, out):  # type: ignore[no-untyped-def]  # pragma: no cover
    """32-bit rings: ``out[j, k] = sum_a u[k,a] * sum_b v[k,b] * xs[j][a*B+b]`` mod 2^64 (uint64
    wraps), for each vector of the tuple ``xs`` (int32, one length) and the three challenges ``k``,
    in one pass: a row of each vector is read once, so a site projects its input and the sum
    together."""
    length = xs[0].size
    width = v.shape[1]
    v0, v1, v2 = v[0], v[1], v[2]
    for j in range(len(xs)):
        for k in range(3):
            out[j, k] = 0
    for a in range(u.shape[1]):
        lo = a * width
        hi = min(lo + width, length)
        for j in range(len(xs)):
            x = xs[j]
            a0 = a1 = a2 = np.uint64(0)
            for i in range(lo, hi):
                xi = np.uint64(np.int64(x[i]))
                b = i - lo
                a0 += xi * v0[b]
                a1 += xi * v1[b]
                a2 += xi * v2[b]
            out[j, 0] += u[0, a] * a0
            out[j, 1] += u[1, a] * a1
            out[j, 2] += u[2, a] * a2


@njit(cache=True, nogil=True)
def _mul_wide(a, b):  # type: ignore[no-untyped-def]  # pragma: no cover
    """The 128-bit product of two uint64 values, as (low word, high word)."""
    low = np.uint64(0xFFFFFFFF)
    s = np.uint64(32)
    al, ah, bl, bh = a & low, a >> s, b & low, b >> s
    p0, p1, p2, p3 = al * bl, al * bh, ah * bl, ah * bh
    mid = (p0 >> s) + (p1 & low) + (p2 & low)
    return (p0 & low) | (mid << s), p3 + (p1 >> s) + (p2 >> s) + (mid >> s)


@njit(cache=True, nogil=True, boundscheck=False)
def project_wide(x, u, v, out):  # type: ignore[no-untyped-def]  # pragma: no cover
    """64-bit rings: ``out[k] = (low, high)`` words of the projection mod 2^128.

    Per row and challenge, ``sum_b v[k,b] * x[a*B+b]`` is kept as 32-bit column sums ``c0..c3``
    (rows of ``B < 2^30`` values cannot overflow one) and ``neg``, ``v`` summed over the negative
    ``x`` (mod 2^64): their lift to ``2^128`` adds ``(2^64 - 1) 2^64``, i.e. ``-v 2^64``.  The row's
    value ``c0 + c1 2^32 + (c2 - neg) 2^64 + c3 2^96`` is then multiplied by ``u[k,a]`` mod 2^128.
    """
    low = np.uint64(0xFFFFFFFF)
    s = np.uint64(32)
    top = np.uint64(63)
    zero = np.uint64(0)
    length = x.size
    width = v.shape[1]
    for k in range(v.shape[0]):
        vk = v[k]
        acc_lo = zero
        acc_hi = zero
        for a in range(u.shape[1]):
            lo = a * width
            hi = min(lo + width, length)
            c0 = c1 = c2 = c3 = neg = zero
            for i in range(lo, hi):
                xu = np.uint64(x[i])
                vv = vk[i - lo]
                xl, xh, vl, vh = xu & low, xu >> s, vv & low, vv >> s
                p0, p1, p2, p3 = xl * vl, xl * vh, xh * vl, xh * vh
                c0 += p0 & low
                c1 += (p0 >> s) + (p1 & low) + (p2 & low)
                c2 += (p1 >> s) + (p2 >> s) + (p3 & low)
                c3 += p3 >> s
                neg += vv & (zero - (xu >> top))  # branch-free: v where x < 0
            w_lo = c0 + ((c1 & low) << s)
            carry = np.uint64(1) if w_lo < c0 else zero
            w_hi = (c1 >> s) + carry + c2 - neg + (c3 << s)
            m_lo, m_hi = _mul_wide(u[k, a], w_lo)
            m_hi += u[k, a] * w_hi
            acc_lo += m_lo
            acc_hi += m_hi + (np.uint64(1) if acc_lo < m_lo else zero)
        out[k, 0] = acc_lo
        out[k, 1] = acc_hi


def warm(bits: int) -> None:
    """Load (or compile) the kernels for a ring of ``bits`` before a round needs them.  The first
    call costs about a second of CPU; a site makes it while it sets up, so it never falls inside
    a stage's deadline."""
    ring = np.uint32 if bits == 32 else np.uint64
    out = np.zeros(1, dtype=ring)
    quantize_block(np.zeros(1, np.float32), np.float32(1.0), 1.0, np.zeros(1, np.uint16), out)
    add_streams(out, np.zeros((1, 1), dtype=ring), 1)
    words = np.zeros((3, 1), dtype=np.uint64)
    if bits == 32:
        for count in (1, 2):
            project_narrow((np.zeros(1, np.int32),) * count, words, words, np.zeros((count, 3), np.uint64))
    else:
        project_wide(np.zeros(1, np.int64), words, words, np.zeros((3, 2), np.uint64))
