"""A coordinator that deviates at every stage at once (sans-IO), and what it can unmask afterwards.

``attack`` drives honest site machines with a :class:`Deviation`: a different set of advertised
sites (hence a different graph) for each site, any subset of each site's incoming shares, two
competing survivor lists, and any "dropped" list at unmasking, with every valid signature it
collected.  ``unmaskable`` then works out, from the shares the sites revealed and the masks they
really applied (read from the machines, not from their checks), which linear combinations of the
masked inputs the coordinator can strip of every mask it does not know: the independent judge
the property tests compare against the policy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from asagiri.policy import Refusal
from asagiri.secagg.graph import graph_seed, neighbours
from asagiri.secagg.masking import sign
from asagiri.secagg.server import Outbound
from asagiri.wire.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySig,
    KeyRoster,
    MaskedInput,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

from .harness import Federation


@dataclass
class Deviation:
    views: dict[int, list[int]]  # U1 as shown to each site
    deliver: dict[int, set[int]]  # senders whose ciphertexts each recipient gets
    lists: list[list[int]]  # competing survivor lists
    assign: dict[int, int]  # the list each site is asked to sign
    dropped: dict[int, list[int]]  # the "dropped" list each site is shown at unmasking


@dataclass
class Outcome:
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    revealed_b: dict[int, set[int]] = field(default_factory=dict)  # owner -> share x's revealed
    revealed_s: dict[int, set[int]] = field(default_factory=dict)
    refusals: dict[int, str] = field(default_factory=dict)


def _step(fed: Federation, site: int, msg, outcome: Outcome, inputs) -> list:
    if site in outcome.refusals:
        return []
    client = fed.clients[site]
    try:
        replies = client.receive(msg)
        if client.stage.value == "ready" and site in inputs:
            replies += client.set_quantized(inputs.pop(site))
    except Refusal as exc:
        outcome.refusals[site] = str(exc)
        return []
    fed.sent += [(site, r) for r in replies]
    return replies


def attack(fed: Federation, dev: Deviation, inputs: dict[int, np.ndarray]) -> Outcome:
    """Run one round under ``dev``; every site reply is kept in ``fed.sent``."""
    out = Outcome()
    inputs = dict(inputs)
    ctx = fed.params.context
    degree = fed.params.degree or None
    # Advertise: every site gets the honest SecAggStart.
    keys: dict[int, AdvertiseKeys] = {}
    for o in fed.server.start():
        for reply in _step(fed, o.site, o.msg, out, inputs):
            keys[o.site] = reply
    # Roster: each site is shown its own U1 and the honest signed keys of its neighbours in it.
    shares: dict[int, ShareKeys] = {}
    for u, view in dev.views.items():
        view = [v for v in view if v in keys]
        if u not in view:
            continue
        nbrs = neighbours(view, degree, graph_seed(ctx, view))[u]
        entries = [[v, keys[v].c_pk, keys[v].s_pk, keys[v].signature] for v in nbrs]
        for reply in _step(fed, u, KeyRoster(fed.rnd, fed.attempt, sorted(view), entries), out, inputs):
            shares[u] = reply
    # Share delivery: any subset of what was addressed to each site.
    for u in fed.ids:
        items = [[v, ct] for v, msg in shares.items() for r, ct in msg.shares if r == u and v in dev.deliver.get(u, ())]
        for reply in _step(fed, u, ShareDelivery(fed.rnd, fed.attempt, items), out, inputs):
            if isinstance(reply, MaskedInput):
                out.masked[u] = reply.vector["y"]
    # Consistency: two competing lists; each site signs the one it is shown (if it will).
    sigs: dict[int, dict[int, ConsistencySig]] = {i: {} for i in range(len(dev.lists))}
    for u, index in dev.assign.items():
        for reply in _step(fed, u, ConsistencyCheck(fed.rnd, fed.attempt, dev.lists[index]), out, inputs):
            sigs[index][u] = reply
    # Unmask: each signer is shown its list, any dropped list, and every signature on that list.
    for index, signed in sigs.items():
        proof = [[s, sig.masked_with, sig.signature] for s, sig in signed.items()]
        for u in signed:
            req = UnmaskRequest(fed.rnd, fed.attempt, dev.lists[index], dev.dropped.get(u, []), proof)
            for reply in _step(fed, u, req, out, inputs):
                assert isinstance(reply, UnmaskResponse)
                for owner, share in reply.b_shares:
                    out.revealed_b.setdefault(owner, set()).add(int.from_bytes(share[:2], "big"))
                for owner, share in reply.s_shares:
                    out.revealed_s.setdefault(owner, set()).add(int.from_bytes(share[:2], "big"))
    return out


def unmaskable(fed: Federation, outcome: Outcome, *, below: int, colluders: frozenset[int] = frozenset()
               ) -> list[tuple[int, ...]]:
    """Sets of fewer than ``below`` honest sites whose masked inputs combine into something mask-free.

    ``colluders`` hand the coordinator their seeds, masking keys and inputs: every mask they
    added or share is known, and their rows can be added to any combination for free.

    Rows: the sites that sent a masked input.  Columns: every mask the coordinator cannot compute:
    a self mask whose seed it has fewer than t shares of, and a pairwise mask neither of whose
    masking keys it has t shares of.  A combination of rows cancels every such column iff it lies
    in the left null space; a set S of rows supports one iff rank(A_S) < |S|.
    """
    t = fed.params.threshold
    held = {c: fed.clients[c]._round.held for c in colluders if fed.clients[c]._round is not None}
    revealed_b = {u: set(xs) for u, xs in outcome.revealed_b.items()}
    revealed_s = {u: set(xs) for u, xs in outcome.revealed_s.items()}
    for shares in held.values():
        for owner, (b, s) in shares.items():
            revealed_b.setdefault(owner, set()).add(int.from_bytes(b[:2], "big"))
            revealed_s.setdefault(owner, set()).add(int.from_bytes(s[:2], "big"))
    b_known = {u for u, xs in revealed_b.items() if len(xs) >= t} | set(colluders)
    s_known = {u for u, xs in revealed_s.items() if len(xs) >= t} | set(colluders)
    rows = sorted(u for u in outcome.masked if u not in colluders)
    columns: dict[tuple, int] = {}
    entries: list[tuple[int, int, int]] = []
    for i, u in enumerate(rows):
        r = fed.clients[u]._round
        if u not in b_known:
            entries.append((i, columns.setdefault(("b", u), len(columns)), 1))
        for w in r.masked_with:
            if u in s_known or w in s_known:
                continue
            entries.append((i, columns.setdefault(("p", min(u, w), max(u, w)), len(columns)), sign(u, w)))
    a = np.zeros((len(rows), max(1, len(columns))))
    for i, j, v in entries:
        a[i, j] = v
    leaks = []
    for size in range(1, below):
        for subset in itertools.combinations(range(len(rows)), size):
            if np.linalg.matrix_rank(a[list(subset)]) < size:
                leaks.append(tuple(rows[i] for i in subset))
    return leaks


def honest_deviation(fed: Federation) -> Deviation:
    """The protocol as written: the baseline every deviation is drawn around."""
    ids = fed.ids
    return Deviation(views={u: list(ids) for u in ids}, deliver={u: set(ids) for u in ids}, lists=[list(ids)],
                     assign={u: 0 for u in ids}, dropped={u: [] for u in ids})


__all__ = ["Deviation", "Outbound", "Outcome", "attack", "honest_deviation", "unmaskable"]
