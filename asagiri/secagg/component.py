"""Which sites any sum the coordinator can unmask must contain, seen from one site.

A pairwise mask cancels only if both ends added it, and the coordinator can compute it only from
one of the two masking keys, which honest sites reveal only for sites on the dropped list.  So any
mask-free combination of masked inputs that holds site ``u``'s input holds the input of every
survivor joined to ``u`` by masks both ends added: ``u``'s *masking component*.  Each survivor's
claim of whom it masked with is signed (``binding.survivors_message``), so a site can work the
component out before it reveals anything.  docs/secagg.md has the argument;
``tests/secagg/adversary.py`` checks it independently.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

__all__ = ["MAX_REMOVALS", "component_survives", "masking_component", "mutual_masks"]


def mutual_masks(survivors: list[int], masked_with: Mapping[int, list[int] | set[int]]) -> dict[int, set[int]]:
    """Survivors joined by pairwise masks that both ends added (each end's claim signed).

    ``masked_with[u]``: whom ``u`` says it masked with.  A mask only one side added never cancels,
    so it never lets the coordinator unmask anything: such pairs are not edges.
    """
    alive = set(survivors)
    claims = {u: set(vs) & alive for u, vs in masked_with.items() if u in alive}
    return {u: {w for w in vs if u in claims.get(w, ())} for u, vs in claims.items()}


def masking_component(me: int, graph: Mapping[int, set[int]], removed: frozenset[int] = frozenset()) -> set[int]:
    seen, todo = {me}, [me]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen and w not in removed:
                seen.add(w)
                todo.append(w)
    return seen


# Removal sets tried before a site gives up and refuses (a conservative answer).
MAX_REMOVALS = 20_000


def component_survives(me: int, graph: Mapping[int, set[int]], *, needed: int, colluders: int) -> tuple[bool, str]:
    """Whether ``me``'s masking component keeps ``needed`` members whichever ``colluders`` others go.

    A colluder's masks are ones the coordinator can compute, and its input one it knows: removing
    it from the graph is what collusion does.  With no colluders this is the component's size.
    """
    component = masking_component(me, graph)
    if len(component) < needed:
        return False, f"{len(component)} sites in this site's masking component {sorted(component)}, fewer than {needed}"
    if colluders == 0:
        return True, ""
    if len(graph.get(me, ())) >= needed - 1 + colluders:
        return True, ""  # enough direct partners: any `colluders` of them leave needed - 1
    others = sorted(component - {me})
    if len(others) <= colluders:  # the colluders could be all of them (found in review)
        return False, f"{len(others)} other sites in this site's masking component, no more than {colluders} colluders"
    if math.comb(len(others), colluders) > MAX_REMOVALS:
        return False, (f"{len(graph.get(me, ()))} direct mask partners, and too many ways to remove {colluders} "
                       f"colluders to check them all")
    for removed in itertools.combinations(others, colluders):
        left = masking_component(me, graph, frozenset(removed))
        if len(left) < needed:
            return False, (f"without sites {list(removed)} this site's masking component is {sorted(left)}, "
                           f"fewer than {needed}")
    return True, ""
