"""Pure, seeded partitioners of sample indices across sites (non-IID label skew and quantity skew)."""

from __future__ import annotations

import numpy as np

__all__ = [
    "dirichlet_draw",
    "dirichlet_partition",
    "feature_partition",
    "iid_partition",
    "partition",
    "proportional_partition",
    "quantity_partition",
]


def iid_partition(n: int, n_sites: int, *, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [np.sort(part) for part in np.array_split(order, n_sites)]


def quantity_partition(n: int, n_sites: int, alpha: float, *, rng: np.random.Generator,
                       min_size: int = 1) -> list[np.ndarray]:
    """Same label mix, sizes drawn from Dirichlet(alpha); every site gets at least ``min_size``
    samples (at most half an even share), and at least one."""
    if n < n_sites:
        raise ValueError(f"cannot give {n_sites} sites a sample each from {n} samples")
    floor = max(1, min(min_size, n // (2 * n_sites)))
    props = rng.dirichlet(np.full(n_sites, alpha))
    sizes = floor + np.floor(props * (n - n_sites * floor)).astype(int)
    sizes[np.argmax(sizes)] += n - sizes.sum()
    order = rng.permutation(n)
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(part) for part in np.split(order, cuts)]


def dirichlet_partition(
    labels: np.ndarray, n_sites: int, alpha: float, *, rng: np.random.Generator, min_size: int = 10
) -> list[np.ndarray]:
    """Label skew: for each class, split its samples across sites in Dirichlet(alpha) proportions.

    Redraws (a bounded number of times) until every site holds at least ``min_size`` samples, the
    usual practice since Hsu et al. 2019; deterministic for a given generator state.
    """
    return dirichlet_draw(labels, n_sites, alpha, rng=rng, min_size=min_size)[0]


def dirichlet_draw(
    labels: np.ndarray, n_sites: int, alpha: float, *, rng: np.random.Generator, min_size: int = 10
) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
    """:func:`dirichlet_partition`, also returning each class's site proportions."""
    labels = _first_label(labels)
    classes = np.unique(labels)
    min_size = min(min_size, len(labels) // (2 * n_sites))  # at most half an even share, so a draw can pass
    for _ in range(1000):
        proportions = {}
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            idx = idx[rng.permutation(len(idx))]
            proportions[int(c)] = props = rng.dirichlet(np.full(n_sites, alpha))
            for site, chunk in enumerate(_cut(idx, props)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts], proportions
    raise ValueError(f"could not give every site {min_size} samples with alpha={alpha}")


def proportional_partition(
    labels: np.ndarray, proportions: dict[int, np.ndarray], *, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split each class across sites in given proportions (a class not in them: evenly).

    Used for the validation and test splits under label skew, so each site's held-out data has
    the label mix of its own training data, as a hospital's future patients resemble its past ones.
    """
    labels = _first_label(labels)
    n_sites = len(next(iter(proportions.values())))
    parts: list[list[int]] = [[] for _ in range(n_sites)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        props = proportions.get(int(c), np.full(n_sites, 1 / n_sites))
        for site, chunk in enumerate(_cut(idx, props)):
            parts[site].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _first_label(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels).reshape(len(labels), -1)[:, 0]


def _cut(idx: np.ndarray, props: np.ndarray) -> list[np.ndarray]:
    return np.split(idx, (np.cumsum(props)[:-1] * len(idx)).astype(int))


def feature_partition(values: np.ndarray, n_sites: int, *, seed: int) -> list[np.ndarray]:
    """Feature shift: samples ordered by feature value (most frequent first, random within a value),
    then cut into equal contiguous chunks, so each site holds one or two acquisition groups."""
    values = np.asarray(values).astype(str)
    rng = np.random.default_rng([seed, 99])
    uniq, counts = np.unique(values, return_counts=True)
    rank = {v: r for r, v in enumerate(uniq[np.argsort(-counts, kind="stable")])}
    order = np.lexsort((rng.random(len(values)), np.array([rank[v] for v in values])))
    return [np.sort(part) for part in np.array_split(order, n_sites)]


def partition(
    labels: np.ndarray, n_sites: int, *, scheme: str, alpha: float, seed: int, stream: int = 0,
    min_size: int | None = None,
) -> list[np.ndarray]:
    """Dispatch by scheme; ``stream`` separates the draws for train/val/test of the same seed.
    ``min_size``: the fewest samples a skewed split gives a site (default: the partitioner's)."""
    rng = np.random.default_rng([seed, stream])
    floor = {} if min_size is None else {"min_size": min_size}
    if scheme == "iid":
        return iid_partition(len(labels), n_sites, rng=rng)
    if scheme == "quantity":
        return quantity_partition(len(labels), n_sites, alpha, rng=rng, **floor)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, n_sites, alpha, rng=rng, **floor)
    raise ValueError(f"unknown partition scheme {scheme!r}")
