"""The verified sum (protocol/SPEC.md §6.8): pure functions, no I/O.

After unmasking, the coordinator announces the sum ``S``.  Every certified survivor ``i`` then
*vouches* for it: from a challenge seed ``c = H(ctx || H(S) || survivors)`` fixed only once ``S``
is, each expands ``K`` random linear forms ``r_k`` and sends ``z_ik = <r_k, x_i>`` (its own
quantised input, lifted to signed integers) under pairwise masks that cancel over the survivors,
signed.  Every site then checks ``sum_i z~_ik == <r_k, S>`` itself.  The details that make it
sound and private (docs/secagg.md, "Verified sums", has the argument):

- **Over ``Z_(2^M)`` with ``M = 2 * bits``, on signed lifts.**  The survivors' true sum never wraps
  (``plan.py``), so the announced ``S`` read as signed integers equals ``sum x_i`` over the
  integers, and any other ``S`` differs by ``e != 0`` with ``|e_j| < 2^bits``.  A check modulo the
  ring itself would be unsound (``e = 2^(bits-1) e_j`` passes with probability 1/2); modulo
  ``2^(2 bits)`` every such ``e`` keeps at least ``bits + 1`` free low bits.
- **Tensor challenges.**  ``r_k[a*B + b] = u_k[a] * v_k[b]`` with ``u_k, v_k`` uniform 64-bit words
  from the PRG under ``c``: ``2 * sqrt(L)`` words per challenge instead of ``L``.  A wrong ``S``
  passes one challenge with probability below ``(m + 2) / 2^(m+1)``, ``m = 33`` for 32-bit rings
  and ``m = 64`` for 64-bit ones: below ``2^-28.8`` and ``2^-58.9``; all ``K = 3`` below
  ``2^-86`` and ``2^-176``.
- **Masks tied to the challenge.**  Each pair's scalar masks are a PRF of a key from the pair's
  X25519 agreement (another label than the round's mask seed) *and* of ``c``: sites shown
  different sums derive different ``c`` and their masks no longer cancel, so a coordinator that
  splits the survivors learns nothing but noise.  No self mask: no survivor's pair key is ever
  revealed, and a survivor that does not vouch leaves the round unverified (the round is then
  retried, which the participation batches make safe).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..wire.crypto import AuthenticationFailed, EphemeralKey, PublicIdentity, blake2b, blake3_chunks
from .kernels import project_narrow, project_wide
from .masking import sign
from .plan import QuantPlan
from .prg import expand

__all__ = [
    "CHALLENGES",
    "VerifiedSum",
    "challenge",
    "challenge_of",
    "challenge_seed",
    "decode_scalars",
    "encode_scalars",
    "masked_scalars",
    "modulus_bits",
    "pair_scalars",
    "project",
    "shape",
    "sum_digest",
    "vouch_key",
    "vouch_message",
    "vouched_total",
    "vouches_problem",
]

CHALLENGES = 3  # K: independent linear forms per round
_PRG = "chacha20"  # the challenge words' PRG, whatever the round's mask PRG


@dataclass(frozen=True)
class VerifiedSum:
    """A sum checked against every certified survivor's vouch (SPEC §6.8), with what the next
    model needs: the plan to dequantise it, and the model the inputs were trained on."""

    round: int
    attempt: int
    total: np.ndarray
    digest: bytes
    survivors: tuple[int, ...]
    plan: QuantPlan
    trained_on: bytes  # the round's params digest, bound into its ctx


def modulus_bits(bits: int) -> int:
    """``M``: the check runs modulo ``2^M``, twice the ring's width."""
    if bits not in (32, 64):
        raise ValueError(f"ring of {bits} bits")
    return 2 * bits


def sum_digest(total: np.ndarray) -> bytes:
    """``BLAKE3("asagiri-sum" || 0x00 || S)``, ``S`` as the ring's little-endian words."""
    flat = np.ascontiguousarray(total).reshape(-1)
    if flat.dtype not in (np.dtype("<u4"), np.dtype("<u8")):
        raise ValueError("a sum is a ring vector of little-endian uint32 or uint64")
    return blake3_chunks([memoryview(flat.view(np.uint8))], domain=b"asagiri-sum")


def _ids(ids: Sequence[int]) -> bytes:
    return struct.pack(">I", len(ids)) + b"".join(struct.pack(">I", i) for i in sorted(ids))


def challenge_seed(ctx: bytes, digest: bytes, survivors: Sequence[int]) -> bytes:
    """``c``: fixed by the round, the announced sum and the certified survivors."""
    return blake2b(b"asagiri-verify\0" + ctx + digest + _ids(survivors), person=b"asagiri-verify")


def shape(length: int) -> tuple[int, int]:
    """``(A, B)``: the vector read as ``A`` rows of ``B = ceil(sqrt(L))`` (the last one short)."""
    if length < 1:
        raise ValueError("an empty vector")
    b = math.isqrt(length - 1) + 1
    return -(-length // b), b


def challenge(seed: bytes, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(u, v)``: ``K x A`` and ``K x B`` uint64 words, ``v`` first, from ChaCha20 under ``seed``."""
    a, b = shape(length)
    words = expand(seed, CHALLENGES * (a + b), np.uint64, prg=_PRG)
    v = words[: CHALLENGES * b].reshape(CHALLENGES, b)
    u = words[CHALLENGES * b :].reshape(CHALLENGES, a)
    return u, v


def project(*vectors: np.ndarray, u: np.ndarray, v: np.ndarray) -> list[list[int]]:
    """``<r_k, lift(x)> mod 2^M`` for each vector ``x`` and challenge ``k``: each a ring vector of
    one length and type (uint32 or uint64), read as signed integers.  32-bit vectors are
    projected together in one pass."""
    if u.shape[0] != CHALLENGES or v.shape[0] != CHALLENGES:
        raise ValueError(f"{CHALLENGES} challenges expected")
    flats = [np.ascontiguousarray(x).reshape(-1) for x in vectors]
    if len({(f.dtype, f.size) for f in flats}) != 1:
        raise ValueError("vectors of one ring and length are projected together")
    if flats[0].dtype == np.uint32:
        out = np.zeros((len(flats), CHALLENGES), dtype=np.uint64)
        project_narrow(tuple(f.view(np.int32) for f in flats), u, v, out)
        return [[int(z) for z in row] for row in out]
    if flats[0].dtype != np.uint64:
        raise ValueError("a ring vector is uint32 or uint64")
    result = []
    for flat in flats:
        wide = np.zeros((CHALLENGES, 2), dtype=np.uint64)
        project_wide(flat.view(np.int64), u, v, wide)
        result.append([int(lo) | (int(hi) << 64) for lo, hi in wide])
    return result


def challenge_of(ctx: bytes, total: np.ndarray, survivors: Sequence[int]) -> tuple[bytes, bytes, tuple[np.ndarray, np.ndarray]]:
    """What an announced sum fixes, for the site vouching and the coordinator checking alike:
    its digest, the challenge seed and the challenge ``(u, v)``."""
    digest = sum_digest(total)
    seed = challenge_seed(ctx, digest, survivors)
    return digest, seed, challenge(seed, np.asarray(total).size)


def vouch_key(s_key: EphemeralKey, peer_s_pk: bytes, u: int, v: int, ctx: bytes) -> bytes:
    """The pair's verification key: the round's masking agreement under another label, so nothing
    the main round reveals (a dropped site's rebuilt key) bears on a survivor pair's."""
    lo, hi = min(u, v), max(u, v)
    return blake2b(s_key.agree(peer_s_pk) + ctx + struct.pack(">II", lo, hi), person=b"asagiri-vpair")


def pair_scalars(key: bytes, seed: bytes, bits: int) -> list[int]:
    """The pair's ``K`` scalar masks for challenge ``seed``: BLAKE2b keyed by the pair key."""
    width = modulus_bits(bits) // 8
    raw = blake2b(seed, key=key, person=b"asagiri-vmask", size=CHALLENGES * width)
    return [int.from_bytes(raw[k * width : (k + 1) * width], "big") for k in range(CHALLENGES)]


def masked_scalars(own: Sequence[int], site: int, pair_keys: Mapping[int, bytes], seed: bytes, bits: int) -> list[int]:
    """``z~_k = z_k + sum_j sign(site, j) * m_jk`` mod 2^M over the survivors ``site`` masked with."""
    mod = 1 << modulus_bits(bits)
    out = list(own)
    for peer, key in pair_keys.items():
        for k, m in enumerate(pair_scalars(key, seed, bits)):
            out[k] += sign(site, peer) * m
    return [z % mod for z in out]


def encode_scalars(values: Sequence[int], bits: int) -> bytes:
    width = modulus_bits(bits) // 8
    if len(values) != CHALLENGES:
        raise ValueError(f"{len(values)} scalars, {CHALLENGES} expected")
    return b"".join(int(z).to_bytes(width, "big") for z in values)


def decode_scalars(raw: bytes, bits: int) -> list[int]:
    """The inverse of :func:`encode_scalars`; raises ``ValueError`` on any other length."""
    width = modulus_bits(bits) // 8
    if not isinstance(raw, bytes) or len(raw) != CHALLENGES * width:
        raise ValueError(f"masked scalars are {CHALLENGES} x {width} bytes")
    return [int.from_bytes(raw[k * width : (k + 1) * width], "big") for k in range(CHALLENGES)]


def vouch_message(ctx: bytes, seed: bytes, site: int, scalars: bytes) -> bytes:
    """What a survivor signs when it vouches: the round, the challenge (so the sum and the
    survivors), and its masked scalars."""
    return b"asagiri-secagg-vouch\0" + ctx + seed + struct.pack(">I", site) + scalars


def vouched_total(scalars: Iterable[bytes], bits: int) -> list[int]:
    """``sum_i z~_ik mod 2^M``: the survivors' masks cancel, leaving ``<r_k, sum_i x_i>``."""
    mod = 1 << modulus_bits(bits)
    total = [0] * CHALLENGES
    for raw in scalars:
        for k, z in enumerate(decode_scalars(raw, bits)):
            total[k] += z
    return [z % mod for z in total]


def vouches_problem(vouches: Mapping[int, tuple[bytes, bytes]], survivors: Sequence[int], *, ctx: bytes, seed: bytes,
                    expected: Sequence[int], bits: int, peers: Mapping[int, PublicIdentity],
                    own: tuple[int, bytes] | None = None) -> tuple[str, str] | None:
    """Why ``vouches`` (site -> (masked scalars, signature)) do not prove the sum whose challenge
    seed is ``seed`` and projections ``expected``, as ``(rule, detail)``; None when they do: one
    vouch per survivor, each signed by its pinned key, and together adding up to ``expected``.
    ``own``: the checking survivor's id and the scalars it sent, which its vouch must carry."""
    if sorted(vouches) != sorted(survivors):
        return "sum", f"vouches from sites {sorted(vouches)}; the certified survivors are {sorted(survivors)}"
    for site, (scalars, sig) in vouches.items():
        if own is not None and site == own[0]:
            if scalars != own[1]:
                return "sum", "the proof carries another vouch in this site's name"
            continue
        peer = peers.get(site)
        if peer is None:
            return "pinned_peers", f"site {site} has no pinned identity key"
        try:
            peer.verify(vouch_message(ctx, seed, site, scalars), sig)
        except AuthenticationFailed:
            return "sum", f"site {site}'s vouch does not verify for this round and sum"
    if vouched_total((s for s, _ in vouches.values()), bits) != list(expected):
        return "sum", "the survivors' vouches do not add up to the announced sum"
    return None
