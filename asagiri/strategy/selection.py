"""Client selection policies: pure functions of (available sites, round, config)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NotEnoughSites", "select_clients"]


class NotEnoughSites(Exception):
    pass


def select_clients(
    available: list[int], *, rnd: int, attempt: int, policy: str, min_clients: int,
    fraction: float = 1.0, max_per_round: int | None = None, seed: int = 0,
) -> list[int]:
    """Pick this round's participants; never fewer than ``min_clients`` (else ``NotEnoughSites``).

    Seeded by (seed, round, attempt) so a resumed run selects as the original would have.
    """
    pool = sorted(available)
    if len(pool) < min_clients:
        raise NotEnoughSites(f"{len(pool)} sites available, {min_clients} needed")
    rng = np.random.default_rng([seed, rnd, attempt])
    if policy == "all":
        count = len(pool)
    elif policy == "fraction":
        count = max(min_clients, math.ceil(fraction * len(pool)))
    elif policy == "range":
        hi = min(len(pool), max_per_round or len(pool))
        count = int(rng.integers(min_clients, hi + 1))
    else:
        raise ValueError(f"unknown selection policy {policy!r}")
    if max_per_round is not None:
        count = max(min_clients, min(count, max_per_round))
    count = min(count, len(pool))
    chosen = rng.choice(pool, size=count, replace=False) if count < len(pool) else np.asarray(pool)
    return sorted(int(s) for s in chosen)
