"""The quantisation plan: the ring width and the largest power-of-two scale for which no sum of
``max_sites`` inputs can wrap (SPEC §6.2).  Pure integer and rational arithmetic, no I/O and no
crypto, so the configuration can check a plan when it is loaded."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np

__all__ = ["QuantPlan", "QuantisationError", "per_site_bound"]


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
