"""The ring never wraps: the plan's bound holds in exact integers at the 32- and 64-bit limits."""

from fractions import Fraction

import numpy as np
import pytest

from asagiri.secagg.kernels import quantize_block
from asagiri.secagg.quantize import QuantisationError, QuantPlan, dequantize, per_site_bound


def worst_case_sum(plan: QuantPlan, value: float) -> tuple[np.ndarray, list[int]]:
    """Every site at the largest weight, every coordinate at ``value``, the rounding noise at its top.

    Every site sends the same row, so the ring's sum is that row times the number of sites, mod
    2**bits (numpy's unsigned arithmetic wraps as the ring does), and the exact sum is the row's
    integers times it: 2**20 sites cost one multiplication, not 2**20 additions."""
    src = np.array([value, value * 2, -value, np.float32(plan.clip)], dtype=np.float32)
    noise = np.full(src.size, 65535, dtype=np.uint16)
    out = np.empty(src.size, dtype=plan.dtype)
    quantize_block(src, np.float32(plan.clip), float(plan.max_samples * plan.scale), noise, out)
    row = [int(r) for r in out.view(plan.signed).tolist()] + [plan.max_samples]
    exact = [r * plan.max_sites for r in row]
    total = np.append(out, plan.dtype(plan.max_samples)) * plan.dtype(plan.max_sites)
    return total, exact


@pytest.mark.parametrize("bits, clip, max_samples, sites", [
    (64, 4.0, 65536, 4),  # the review's case: the float64 check let this wrap
    (64, 0.1, 100_000, 7),  # float32(0.1) > 0.1: the kernel clips a little above the configured clip
    (64, 1e6, 2**20, 3),
    (32, 4.0, 100_000, 4),
    (32, 1.0, 1000, 4),
    (32, 0.1, 1, 100),
    (32, 3.0, 7, 2**20),
])
def test_the_largest_possible_sum_fits_in_exact_integers(bits, clip, max_samples, sites):
    plan = QuantPlan.plan(bits=bits, clip=clip, max_samples=max_samples, max_sites=sites)
    limit = 2 ** (bits - 1) - 1
    assert sites * per_site_bound(clip, max_samples, Fraction(plan.scale)) <= limit
    # One step up would not fit: the plan uses the whole range it may.
    assert sites * per_site_bound(clip, max_samples, Fraction(plan.scale) * 2) > limit
    for value in (clip, -clip, clip * 3):  # at the clip, below it, and clipped from above
        total, exact = worst_case_sum(plan, value)
        assert all(-limit <= e <= limit for e in exact)
        assert total.view(plan.signed).tolist() == exact  # no wrap anywhere
        weighted, count = dequantize(total, plan)
        assert count == sites * max_samples
        assert np.sign(weighted[0]) == np.sign(value)


def test_the_review_case_sums_to_plus_not_minus_a_million():
    plan = QuantPlan.plan(bits=64, clip=4, max_samples=65536, max_sites=4)
    total, _ = worst_case_sum(plan, 4.0)
    weighted, _ = dequantize(total, plan)
    assert weighted[0] == pytest.approx(4 * 65536 * 4.0)  # +1048576
    # The scale the float64 check chose (2**43) wraps the same sum to -1048576: what this test catches.
    floated = QuantPlan(bits=64, clip=4.0, scale=2.0**43, max_samples=65536, max_sites=4)
    total, exact = worst_case_sum(floated, 4.0)
    assert exact[0] > 2**63 - 1
    assert dequantize(total, floated)[0][0] == -1048576


@pytest.mark.parametrize("kwargs", [
    {"bits": 32, "clip": 1e6, "max_samples": 100_000, "max_sites": 4},
    {"bits": 64, "clip": 1.0, "max_samples": 2**62, "max_sites": 4},
    {"bits": 16, "clip": 1.0, "max_samples": 10, "max_sites": 2},
    {"bits": 32.0, "clip": 1.0, "max_samples": 10, "max_sites": 2},
    {"bits": 32, "clip": float("nan"), "max_samples": 10, "max_sites": 2},
    {"bits": 32, "clip": "4", "max_samples": 10, "max_sites": 2},
])
def test_plans_that_cannot_be_made_safe_are_refused(kwargs):
    with pytest.raises(QuantisationError):
        QuantPlan.plan(**kwargs)
