"""Fixed-point quantisation into the ring Z_(2**bits), sized so that the sum can never wrap.

Each site clips its update ``delta`` to ``[-clip, clip]`` per coordinate, multiplies by its sample
count ``n`` and by ``scale``, rounds stochastically (unbiased) and appends ``n`` itself.  With at
most ``max_sites`` sites of at most ``max_samples`` samples each, every coordinate of the true sum
satisfies ``|sum| <= max_sites * per_site_bound < 2**(bits-1)``, and so does the count;
:meth:`QuantPlan.plan` picks the largest power-of-two ``scale`` for which that holds, checked in
exact integers, and refuses a configuration where none does.  The sum is then exact in two's complement, and the
dequantised weighted sum differs from the float sum by less than ``sites / scale`` per coordinate
(each site's rounding error is below ``1 / scale``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .kernels import quantize_block
from .masking import StreamAdder, scratch
from .plan import QuantisationError, QuantPlan, per_site_bound
from .prg import BLOCK, DEFAULT_PRG, Prg, stream

__all__ = ["QuantPlan", "QuantisationError", "dequantize", "per_site_bound", "quantize"]


def quantize(
    delta: np.ndarray,
    num_samples: int,
    plan: QuantPlan,
    *,
    noise_seed: bytes,
    masks: Sequence[tuple[int, bytes]] = (),
    prg: Prg = DEFAULT_PRG,
    plain: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """``floor(n * clip(delta) * scale + u)`` (stochastic rounding), then ``n``; plus the masks.

    ``u`` is uniform on the 2**16 points of [0, 1) drawn from the PRG under ``noise_seed`` (a
    fresh CSPRNG seed per round): rounding is unbiased to within 2**-16 of a quantum, and each
    value's error stays below ``1 / scale``.  ``masks`` are ``(sign, seed)`` PRG streams added
    (sign +1) or subtracted (-1) over the whole ring vector, count included, block by block while
    the block is in cache.  Returns the ring vector and how many coordinates were clipped; the only
    large allocation is the output.  A NaN anywhere raises :class:`QuantisationError`.  ``plain``,
    if given (``d + 1`` of the ring type), receives the vector before masking, each block copied
    while in cache: what the site later vouches for (``verify.py``).
    """
    if not 1 <= num_samples <= plan.max_samples:
        raise QuantisationError(f"num_samples={num_samples} outside 1..{plan.max_samples}")
    flat = np.ascontiguousarray(delta, dtype=np.float32).reshape(-1)
    d = flat.size
    out = np.empty(d + 1, dtype=plan.dtype)
    if plain is not None and (plain.shape != out.shape or plain.dtype != out.dtype):
        raise ValueError(f"plain must be {d + 1} x {out.dtype}")
    noise = stream(noise_seed, prg)
    adder = StreamAdder([(sign, stream(seed, prg)) for sign, seed in masks], out.dtype)
    factor = float(num_samples * plan.scale)
    clip = np.float32(plan.clip)
    u = scratch(np.uint16, min(BLOCK, max(d, 1)))
    clipped = 0
    for start in range(0, d, BLOCK):
        block = out[start : min(start + BLOCK, d)]
        n = block.size
        noise.fill(memoryview(u[:n]))
        c, nan = quantize_block(flat[start : start + n], clip, factor, u[:n], block)
        if nan:
            raise QuantisationError(f"the update has NaN values (at least {nan}); refusing to send it")
        clipped += c
        if plain is not None:
            plain[start : start + n] = block
        adder.add(block)
    out[d] = num_samples
    if plain is not None:
        plain[d] = num_samples
    adder.add(out[d:])
    return out, clipped


def dequantize(total: np.ndarray, plan: QuantPlan) -> tuple[np.ndarray, int]:
    """The float weighted sum and the total sample count from an unmasked ring sum."""
    signed = total.view(plan.signed)
    count = int(signed[-1])
    return signed[:-1].astype(np.float64) / plan.scale, count
