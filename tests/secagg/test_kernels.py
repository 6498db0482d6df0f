"""The compiled kernels against a plain NumPy reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asagiri.secagg.kernels import add_streams, quantize_block
from asagiri.secagg.masking import add_masks
from asagiri.secagg.prg import BLOCK, PRGS, expand
from asagiri.secagg.quantize import QuantisationError, QuantPlan, quantize


def reference_quantize(src, clip, factor, noise, dtype):
    c = np.clip(src, -clip, clip)
    w = np.floor(c.astype(np.float64) * factor + noise.astype(np.float64) / 2**16)
    signed = np.int32 if dtype == np.uint32 else np.int64
    return w.astype(signed).view(dtype), int(np.count_nonzero(c != src))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    clip=st.sampled_from([0.1, 1.0, 4.0]),
    samples=st.integers(1, 5000),
    bits=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_block_matches_numpy(n, clip, samples, bits, seed):
    plan = QuantPlan.plan(bits=bits, clip=clip, max_samples=5000, max_sites=10)
    rng = np.random.default_rng(seed)
    src = (rng.standard_normal(n) * clip * rng.choice([0.01, 0.5, 3.0])).astype(np.float32)
    src[:: max(1, n // 7)] = np.float32(np.inf) if seed % 2 else -np.float32(np.inf)
    noise = rng.integers(0, 2**16, n, dtype=np.uint16)
    factor = float(samples * plan.scale)
    out = np.empty(n, dtype=plan.dtype)
    clipped, nan = quantize_block(src, np.float32(clip), factor, noise, out)
    want, want_clipped = reference_quantize(src, np.float32(clip), factor, noise, plan.dtype)
    assert nan == 0 and clipped == want_clipped
    np.testing.assert_array_equal(out, want)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2000), k=st.integers(1, 4), nplus=st.integers(0, 4), bits=st.sampled_from([32, 64]),
       seed=st.integers(0, 2**32 - 1))
def test_add_streams_is_ring_addition(n, k, nplus, bits, seed):
    dtype = np.uint32 if bits == 32 else np.uint64
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    out = rng.integers(0, info.max, n, dtype=dtype, endpoint=True)
    words = rng.integers(0, info.max, (k, n), dtype=dtype, endpoint=True)
    nplus = min(nplus, k)
    want = out.copy()
    for j in range(k):
        want = want + words[j] if j < nplus else want - words[j]  # NumPy wraps modulo 2**bits
    add_streams(out, words, nplus)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("prg", PRGS)
def test_masks_across_block_boundaries_equal_whole_streams(prg):
    d = 2 * BLOCK + 17
    seeds = [(1, b"a" * 32), (-1, b"b" * 32), (1, b"c" * 32), (-1, b"d" * 32), (1, b"e" * 32)]
    vec = np.arange(d, dtype=np.uint32)
    add_masks(vec, None, seeds, prg=prg)
    want = np.arange(d, dtype=np.uint32)
    for s, seed in seeds:
        want = want + expand(seed, d, prg=prg) if s > 0 else want - expand(seed, d, prg=prg)
    np.testing.assert_array_equal(vec, want)


def test_quantize_refuses_nan():
    plan = QuantPlan.plan(bits=32, clip=1.0, max_samples=100, max_sites=4)
    delta = np.zeros(10, dtype=np.float32)
    delta[3] = np.nan
    with pytest.raises(QuantisationError, match="NaN"):
        quantize(delta, 5, plan, noise_seed=bytes(32))
