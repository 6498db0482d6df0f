"""Who shares with whom: the complete graph (Bonawitz et al. 2017) or a sparse SecAgg+ graph.

SecAgg+ (Bell et al. 2020) replaces the complete graph by a random regular graph chosen from a
public seed, so each site does O(log n) key agreements, shares and masks instead of O(n).  We use
the Harary-style construction of that paper: sites ordered by ``BLAKE2b(seed || id)`` on a ring,
each joined to the ``k/2`` nearest on either side (for odd ``k`` with an even count, also to the
diametrically opposite site).  The seed is derived, never chosen: ``BLAKE2b(ctx, sorted
U1)``, where the round context ``ctx`` carries the round digest (``binding.py``), so every site
computes the same graph and the coordinator cannot pick one.

With participation batches (``rules.batch_map``), every site is also joined to each member of its
own batch: a site masks with its whole batch, so no sum the coordinator can unmask holds part of
a batch (docs/secagg.md, "Participation batches").
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from ..wire.crypto import blake2b

__all__ = ["graph_seed", "neighbours", "ring_order"]


def graph_seed(ctx: bytes, advertised: list[int]) -> bytes:
    """``H("asagiri-graph", ctx || u32 count || u32 id ...)`` over the sites that advertised (U1), ascending."""
    ids = sorted(advertised)
    body = ctx + struct.pack(">I", len(ids)) + b"".join(struct.pack(">I", p) for p in ids)
    return blake2b(body, person=b"asagiri-graph")


def ring_order(ids: list[int], seed: bytes) -> list[int]:
    """The ring: sites sorted by ``H("asagiri-ring", seed || u32 id)``."""
    return sorted(ids, key=lambda u: blake2b(seed + struct.pack(">I", u), person=b"asagiri-ring"))


def neighbours(participants: list[int], degree: int | None, seed: bytes,
               batches: Mapping[int, frozenset[int]] | None = None) -> dict[int, list[int]]:
    """Each participant's neighbours (never itself). ``degree`` None means the complete graph.
    ``batches``: each site's participation batch; its members among ``participants`` are added."""
    ids = sorted(set(participants))
    n = len(ids)
    if degree is None or degree >= n - 1:
        return {u: [v for v in ids if v != u] for u in ids}
    out = _harary(ids, degree, seed)
    if batches is not None:
        present = set(ids)
        for u in ids:
            out[u] |= (batches.get(u, frozenset()) & present) - {u}
    return {u: sorted(vs) for u, vs in out.items()}


def _harary(ids: list[int], degree: int, seed: bytes) -> dict[int, set[int]]:
    n = len(ids)
    if degree < 1:
        raise ValueError("degree must be at least 1")
    ring = ring_order(ids, seed)
    pos = {u: i for i, u in enumerate(ring)}
    half = degree // 2
    out: dict[int, set[int]] = {u: set() for u in ids}
    for u in ids:
        i = pos[u]
        for off in range(1, half + 1):
            for j in (i + off, i - off):
                v = ring[j % n]
                if v != u:
                    out[u].add(v)
                    out[v].add(u)
        if degree % 2 == 1:
            v = ring[(i + n // 2) % n]
            if v != u:
                out[u].add(v)
                out[v].add(u)
    return out
