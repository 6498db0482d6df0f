"""What every party derives from the run's secure-aggregation settings and a participant count
(protocol/SPEC.md §6.2): the quantisation plan, the sharing group and threshold, and the quorum of
survivor-list signatures.

The settings arrive as any object with the fields of fed.yaml's ``secagg:`` section
(:class:`SecAggSettings`; ``config.SecAggConfig`` is one): ``secagg`` reads them and never imports
the configuration.  Whoever loads a fed.yaml checks it with :func:`ring_plan` (``coordinator/checks.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from .plan import QuantPlan

__all__ = ["Batches", "SecAggSettings", "batch_map", "complete_batches", "is_union_of_batches", "quorum",
           "ring_plan", "sharing_group", "spec_of"]

# Each site's participation batch (the whole batch, the site included), by site id.
Batches = Mapping[int, frozenset[int]]


class SecAggSettings(Protocol):
    """The spec's ``secagg`` settings, as the rules read them (``config.SecAggConfig`` fits)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def mode(self) -> str: ...

    @property
    def shares(self) -> int | None: ...

    @property
    def threshold(self) -> int | None: ...

    @property
    def bits(self) -> int: ...

    @property
    def clip(self) -> float: ...

    @property
    def max_samples_per_site(self) -> int: ...

    @property
    def prg(self) -> str: ...

    @property
    def batches(self) -> Sequence[Sequence[int]] | None: ...


def spec_of(settings: SecAggSettings) -> dict[str, Any]:
    """The settings as Welcome's spec carries them under ``secagg`` (what ``SecAggConfig.model_dump``
    gives), for an in-memory round's spec digest."""
    return {k: getattr(settings, k, None) for k in _FIELDS}


_FIELDS = ("enabled", "mode", "shares", "threshold", "bits", "clip", "max_samples_per_site", "prg", "batch_size",
           "batches", "colluders")


def ring_plan(settings: SecAggSettings, sites: int) -> QuantPlan:
    """The quantisation plan for a sum over ``sites`` inputs; raises
    :class:`~asagiri.secagg.plan.QuantisationError` where the ring could wrap."""
    return QuantPlan.plan(bits=settings.bits, clip=settings.clip, max_samples=settings.max_samples_per_site,
                          max_sites=sites)


def sharing_group(settings: SecAggSettings, n: int) -> tuple[int | None, int]:
    """(degree, or None for the complete graph; threshold) for a round of ``n`` participants.

    The coordinator announces both in ``SecAggStart`` and every site recomputes them from the
    same (signed-over) spec, so neither is the coordinator's choice at round time.  ``sparse``
    without ``shares`` picks a group of about ``2 log2 n``.  A configured threshold outside
    [majority, group] is moved to the nearest end.
    """
    degree: int | None = None
    if settings.mode == "sparse":
        shares = settings.shares or max(3, 2 * math.ceil(math.log2(max(n, 2))) + 1)
        degree = shares - 1 if shares < n else None
    size = n if degree is None else degree + 1
    majority = size // 2 + 1
    return degree, min(size, max(majority, settings.threshold or majority))


# The survivor-list quorum counts at least this many participants as colluders, whatever a site's
# policy says: one compromised site that signs two different lists must not get both certified
# (that handed the coordinator another site's seed and masking key: issue 26, attack 4).
SIGNING_COLLUDERS = 1


def quorum(participants: int, colluders: int = 0) -> int:
    """Survivor-list signatures needed so that no two lists can both be certified: more than half
    of the participants, counting every assumed colluder (at least ``SIGNING_COLLUDERS``) as
    signing both.  Two certified lists then share an honest signer, who signs one list only."""
    return (participants + max(colluders, SIGNING_COLLUDERS)) // 2 + 1


# -- participation batches (So et al., AAAI 2023; docs/secagg.md, "Participation batches") ---------------


def batch_map(batches: Sequence[Sequence[int]] | None) -> dict[int, frozenset[int]] | None:
    """Each site's batch by site id, or None for a run without batches.  Raises ``ValueError``
    where a site is in two batches (the policy checks the rest: ``SitePolicy.check_batches``)."""
    if batches is None:
        return None
    out: dict[int, frozenset[int]] = {}
    for batch in batches:
        members = frozenset(int(v) for v in batch)
        for v in members:
            if v in out:
                raise ValueError(f"site {v} is in two participation batches")
            out[v] = members
    return out


def is_union_of_batches(ids: Iterable[int], batches: Batches | None) -> bool:
    """Whether ``ids`` holds every batch it touches whole (always, without batches)."""
    if batches is None:
        return True
    have = set(ids)
    return all(v in batches and batches[v] <= have for v in have)


def complete_batches(ids: Iterable[int], batches: Batches | None) -> list[int]:
    """The members of ``ids`` whose whole batch is in ``ids``, ascending: what a stage keeps when
    some site of a batch went missing (the batch is left out whole)."""
    have = set(ids)
    if batches is None:
        return sorted(have)
    return sorted(v for v in have if v in batches and batches[v] <= have)

