"""What every party derives from the run's secure-aggregation settings and a participant count
(protocol/SPEC.md §6.2): the quantisation plan, the sharing group and threshold, and the quorum of
survivor-list signatures.

The settings arrive as any object with the fields of fed.yaml's ``secagg:`` section
(:class:`SecAggSettings`; ``config.SecAggConfig`` is one): ``secagg`` reads them and never imports
the configuration.  Whoever loads a fed.yaml checks it with :func:`ring_plan` (``coordinator/checks.py``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from .plan import QuantPlan

__all__ = ["SecAggSettings", "quorum", "ring_plan", "sharing_group", "spec_of"]


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


def spec_of(settings: SecAggSettings) -> dict[str, Any]:
    """The settings as Welcome's spec carries them under ``secagg`` (what ``SecAggConfig.model_dump``
    gives), for an in-memory round's spec digest."""
    return {k: getattr(settings, k) for k in _FIELDS}


_FIELDS = ("enabled", "mode", "shares", "threshold", "bits", "clip", "max_samples_per_site", "prg")


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
