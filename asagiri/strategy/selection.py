"""Client selection policies: pure functions of (available sites, round, config)."""

from __future__ import annotations

import math

import numpy as np

from ..secagg.rules import batch_map, complete_batches

__all__ = ["NotEnoughSites", "select_clients", "usable_sites"]


class NotEnoughSites(Exception):
    pass


def select_clients(
    available: list[int], *, rnd: int, attempt: int, policy: str, min_clients: int,
    fraction: float = 1.0, max_per_round: int | None = None, seed: int = 0,
    batches: list[list[int]] | None = None,
) -> list[int]:
    """Pick this round's participants; never fewer than ``min_clients`` (else ``NotEnoughSites``).

    Seeded by (seed, round, attempt) so a resumed run selects as the original would have.  With
    participation ``batches``, whole batches are picked, and only those whose every member is
    available (the sites refuse any other round).
    """
    if batches is not None:
        return _select_batches(available, batches, rnd=rnd, attempt=attempt, policy=policy, min_clients=min_clients,
                               fraction=fraction, max_per_round=max_per_round, seed=seed)
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


def usable_sites(available: list[int], batches: list[list[int]] | None) -> list[int]:
    """The available sites that can train: with batches, the members of whole available batches."""
    return complete_batches(available, batch_map(batches))


def _select_batches(available: list[int], batches: list[list[int]], *, rnd: int, attempt: int, policy: str,
                    min_clients: int, fraction: float, max_per_round: int | None, seed: int) -> list[int]:
    have = set(available)
    units = [sorted(b) for b in sorted(batches, key=min) if set(b) <= have]
    pool = sum(len(u) for u in units)
    if pool < min_clients:
        raise NotEnoughSites(f"{pool} sites in whole participation batches available, {min_clients} needed")
    rng = np.random.default_rng([seed, rnd, attempt])
    if policy == "all":
        count = pool
    elif policy == "fraction":
        count = max(min_clients, math.ceil(fraction * pool))
    elif policy == "range":
        count = int(rng.integers(min_clients, min(pool, max_per_round or pool) + 1))
    else:
        raise ValueError(f"unknown selection policy {policy!r}")
    cap = pool if max_per_round is None else max(min_clients, max_per_round)
    chosen: list[int] = []
    for i in rng.permutation(len(units)):
        if len(chosen) >= min(count, cap):
            break
        if len(chosen) >= min_clients and len(chosen) + len(units[i]) > cap:
            continue
        chosen += units[i]
    if len(chosen) < min_clients:
        raise NotEnoughSites(f"no whole participation batches of {min_clients} or more sites within "
                             f"max_per_round={max_per_round}")
    return sorted(chosen)
