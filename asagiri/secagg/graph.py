"""Who shares with whom: the complete graph (Bonawitz et al. 2017) or a sparse SecAgg+ graph.

SecAgg+ (Bell et al. 2020) replaces the complete graph by a random regular graph chosen from a
public seed, so each site does O(log n) key agreements, shares and masks instead of O(n).  We use
the Harary-style construction of that paper: sites ordered by ``BLAKE2b(seed || id)`` on a ring,
each joined to the ``k/2`` nearest on either side (for odd ``k`` with an even count, also to the
diametrically opposite site).  The seed is derived, never chosen: ``BLAKE2b(ctx, sorted
U1)``, where the round context ``ctx`` carries the round digest (``binding.py``), so every site
computes the same graph and the coordinator cannot pick one.

With participation batches a site also masks with every other member of its batch
(:func:`batch_mates`), whether or not the graph joins them: those masks never need removing,
since a batch is summed whole or not at all, so they need no shares (protocol/SPEC.md §6.7).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from ..wire.crypto import blake2b

__all__ = ["batch_mates", "graph_seed", "mask_peers", "neighbours", "ring_order"]


def graph_seed(ctx: bytes, advertised: list[int]) -> bytes:
    """``H("asagiri-graph", ctx || u32 count || u32 id ...)`` over the sites that advertised (U1), ascending."""
    ids = sorted(advertised)
    body = ctx + struct.pack(">I", len(ids)) + b"".join(struct.pack(">I", p) for p in ids)
    return blake2b(body, person=b"asagiri-graph")


def ring_order(ids: list[int], seed: bytes) -> list[int]:
    """The ring: sites sorted by ``H("asagiri-ring", seed || u32 id)``."""
    return sorted(ids, key=lambda u: blake2b(seed + struct.pack(">I", u), person=b"asagiri-ring"))


def neighbours(participants: list[int], degree: int | None, seed: bytes) -> dict[int, list[int]]:
    """Each participant's neighbours (never itself). ``degree`` None means the complete graph."""
    ids = sorted(set(participants))
    n = len(ids)
    if degree is None or degree >= n - 1:
        return {u: [v for v in ids if v != u] for u in ids}
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
    return {u: sorted(vs) for u, vs in out.items()}


def batch_mates(site: int, present: Iterable[int], batches: Mapping[int, frozenset[int]] | None) -> list[int]:
    """The other members of ``site``'s participation batch among ``present`` (none without batches)."""
    if batches is None:
        return []
    return sorted((batches.get(site, frozenset()) & set(present)) - {site})


def mask_peers(site: int, nbrs: list[int], present: Iterable[int],
               batches: Mapping[int, frozenset[int]] | None) -> list[int]:
    """Whose keys ``site`` gets in its KeyRoster: its graph neighbours and its batch-mates."""
    return sorted(set(nbrs) | set(batch_mates(site, present, batches)))
