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

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np

from .kernels import quantize_block
from .masking import StreamAdder, scratch
from .prg import BLOCK, DEFAULT_PRG, Prg, stream

__all__ = ["QuantPlan", "QuantisationError", "dequantize", "per_site_bound", "quantize"]


class QuantisationError(ValueError):
    """The configuration could overflow the ring, or an input is out of its declared range."""


@dataclass(frozen=True)
class QuantPlan:
    bits: int
    clip: float
    scale: float
    max_samples: int
    max_sites: int

    @classmethod
    def plan(cls, *, bits: int, clip: float, max_samples: int, max_sites: int) -> QuantPlan:
        """The largest power-of-two ``scale`` for which no sum of ``max_sites`` inputs can wrap.

        Checked in exact rational arithmetic (float64 would round ``2**63 - 1`` up to ``2**63``):
        ``max_sites * per_site_bound(scale) <= 2**(bits-1) - 1``, see :func:`per_site_bound`.
        """
        if type(bits) is not int or bits not in (32, 64):
            raise QuantisationError(f"secagg.bits={bits}: must be 32 or 64")
        if not (isinstance(clip, float | int) and math.isfinite(clip) and clip > 0):
            raise QuantisationError("secagg: clip must be a positive, finite number")
        if type(max_samples) is not int or type(max_sites) is not int or max_samples < 1 or max_sites < 1:
            raise QuantisationError("secagg: max_samples_per_site and the site count must be positive integers")
        limit = 2 ** (bits - 1) - 1
        if max_sites * max_samples > limit:
            raise QuantisationError(
                f"secagg: {max_sites} sites x {max_samples} samples cannot be counted in {bits} bits"
            )

        def fits(k: int) -> bool:
            return max_sites * per_site_bound(clip, max_samples, Fraction(2) ** k) <= limit

        if not fits(0):
            raise QuantisationError(
                f"secagg: {max_sites} sites x {max_samples} samples x clip {clip} overflow {bits}-bit "
                f"masks (scale would be below 1); use bits: 64, a smaller clip or max_samples_per_site"
            )
        k = 0  # exponential then binary search for the largest k that fits; k < bits always
        hi = 1
        while fits(hi):
            k, hi = hi, hi * 2
        while hi - k > 1:
            mid = (k + hi) // 2
            k, hi = (mid, hi) if fits(mid) else (k, mid)
        return cls(bits=bits, clip=float(clip), scale=float(2**k), max_samples=max_samples, max_sites=max_sites)

    @property
    def dtype(self) -> type:
        return np.uint32 if self.bits == 32 else np.uint64

    @property
    def signed(self) -> type:
        return np.int32 if self.bits == 32 else np.int64

    def error_bound(self, sites: int) -> float:
        """Largest possible |dequantised - float| per coordinate of the weighted sum (pre-clipping)."""
        return sites / self.scale

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def per_site_bound(clip: float, max_samples: int, scale: Fraction) -> int:
    """The largest ``|q|`` one site's quantiser can output for any value, as an exact integer.

    The kernel clips at float32 precision (``float32(clip)`` may exceed ``clip``), multiplies in
    float64 and adds noise below 1 before flooring.  With ``X = max_samples * float32(clip) *
    scale``, each float64 rounding is within a factor ``1 + 2**-53``, so
    ``|q| <= X * (1 + 2**-53)**2 + 1 < X * (1 + 2**-51) + 1``.
    """
    x = max_samples * Fraction(float(np.float32(clip))) * scale
    return math.floor(x * (1 + Fraction(1, 2**51))) + 1


def quantize(
    delta: np.ndarray,
    num_samples: int,
    plan: QuantPlan,
    *,
    noise_seed: bytes,
    masks: Sequence[tuple[int, bytes]] = (),
    prg: Prg = DEFAULT_PRG,
) -> tuple[np.ndarray, int]:
    """``floor(n * clip(delta) * scale + u)`` (stochastic rounding), then ``n``; plus the masks.

    ``u`` is uniform on the 2**16 points of [0, 1) drawn from the PRG under ``noise_seed`` (a
    fresh CSPRNG seed per round): rounding is unbiased to within 2**-16 of a quantum, and each
    value's error stays below ``1 / scale``.  ``masks`` are ``(sign, seed)`` PRG streams added
    (sign +1) or subtracted (-1) over the whole ring vector, count included, block by block while
    the block is in cache.  Returns the ring vector and how many coordinates were clipped; the only
    large allocation is the output.  A NaN anywhere raises :class:`QuantisationError`.
    """
    if not 1 <= num_samples <= plan.max_samples:
        raise QuantisationError(f"num_samples={num_samples} outside 1..{plan.max_samples}")
    flat = np.ascontiguousarray(delta, dtype=np.float32).reshape(-1)
    d = flat.size
    out = np.empty(d + 1, dtype=plan.dtype)
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
        adder.add(block)
    out[d] = num_samples
    adder.add(out[d:])
    return out, clipped


def dequantize(total: np.ndarray, plan: QuantPlan) -> tuple[np.ndarray, int]:
    """The float weighted sum and the total sample count from an unmasked ring sum."""
    signed = total.view(plan.signed)
    count = int(signed[-1])
    return signed[:-1].astype(np.float64) / plan.scale, count
