"""Participation batches (So et al., AAAI 2023): every sum is of whole batches, in process.

The property the batches are for: any two sums the coordinator can unmask differ by whole
batches or not at all.  Here: the pure rules, the graph, the coordinator's trimming, the sites'
refusals, and a property test that a completed round sums exactly the whole batches that were
alive through the masked-input stage, whatever drops out where.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asagiri.causes import AbortCause
from asagiri.config import FederationConfig, PolicyConfig, RunSpec, SecAggConfig
from asagiri.errors import Refusal
from asagiri.policy import SitePolicy
from asagiri.secagg.graph import batch_mates, graph_seed, mask_peers, neighbours
from asagiri.secagg.rules import batch_map, complete_batches, is_union_of_batches
from asagiri.secagg.server import ServerStage
from asagiri.wire.crypto import Identity

from .harness import STAGES, Federation, ring_inputs

POLICY2 = PolicyConfig(min_participants=2, min_group=2)


def sites(n: int) -> list[dict]:
    return [{"id": i, "public_key": secrets.token_hex(32)} for i in range(1, n + 1)]


# -- the rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "size", "sizes"), [(3, 3, [3]), (5, 3, [5]), (7, 3, [4, 3]), (10, 3, [4, 3, 3]),
                                                  (2, 3, [2]), (12, 4, [4, 4, 4]), (9, 2, [3, 2, 2, 2])])
def test_the_enrolled_sites_are_cut_into_batches_of_at_least_batch_size(n, size, sizes):
    cfg = FederationConfig.model_validate({"sites": sites(n), "min_clients": 1, "secagg": {"batch_size": size}})
    batches = cfg.participation_batches()
    assert [len(b) for b in batches] == sizes
    assert sorted(v for b in batches for v in b) == list(range(1, n + 1))
    assert RunSpec.of(cfg).wire()["secagg"]["batches"] == batches  # the spec carries the cut, so it is signed


def test_explicit_batches_must_partition_the_enrolled_sites():
    ok = FederationConfig.model_validate({"sites": sites(4), "secagg": {"batches": [[1, 4], [2, 3]]}})
    assert ok.participation_batches() == [[1, 4], [2, 3]]
    with pytest.raises(ValueError, match="exactly one batch"):
        SecAggConfig(batches=[[1, 2], [2, 3]])
    with pytest.raises(ValueError, match="every enrolled site"):
        FederationConfig.model_validate({"sites": sites(4), "secagg": {"batches": [[1, 2], [3]]}})
    off = FederationConfig.model_validate({"sites": sites(4), "secagg": {"batch_size": None}})
    assert off.participation_batches() is None


def test_whole_batches():
    b = batch_map([[1, 2], [3, 4, 5]])
    assert is_union_of_batches([1, 2], b) and is_union_of_batches([1, 2, 3, 4, 5], b)
    assert not is_union_of_batches([1, 2, 3], b) and not is_union_of_batches([6], b)
    assert complete_batches([1, 2, 3, 4], b) == [1, 2]
    assert complete_batches([1, 3, 4], None) == [1, 3, 4]
    with pytest.raises(ValueError, match="two participation batches"):
        batch_map([[1, 2], [2]])


def test_a_site_gets_the_keys_of_its_whole_batch_besides_its_graph_neighbours():
    ids = list(range(1, 21))
    b = batch_map([ids[i:i + 4] for i in range(0, 20, 4)])
    graph = neighbours(ids, 2, graph_seed(b"ctx", ids))
    for u in ids:
        peers = mask_peers(u, graph[u], ids, b)
        assert set(graph[u]) <= set(peers) and b[u] - {u} <= set(peers) and u not in peers
        assert batch_mates(u, [u, *graph[u]], b) == sorted((b[u] - {u}) & set(graph[u]))  # only those present
    assert mask_peers(1, graph[1], ids, None) == graph[1]


# -- the site's policy -------------------------------------------------------------------------------


def spec_with(batches, **secagg) -> RunSpec:
    cfg = FederationConfig.model_validate({"sites": sites(6), "min_clients": 4, "secagg": {"batches": batches,
                                                                                           **secagg}})
    return RunSpec.model_validate(RunSpec.of(cfg).wire())


def policy(**cfg) -> SitePolicy:
    return SitePolicy(PolicyConfig(**cfg), {i: Identity.generate().public for i in range(1, 7)})


def test_the_default_policy_refuses_a_run_without_batches_or_with_small_ones():
    with pytest.raises(Refusal, match="batches: the run cuts its sites into no participation batches"):
        policy().check_batches(spec_with(None, batch_size=None), 1)
    policy(require_batches=False).check_batches(spec_with(None, batch_size=None), 1)  # the site's own choice
    with pytest.raises(Refusal, match="a participation batch of 2 sites; this site needs 3"):
        policy().check_batches(spec_with([[1, 2], [3, 4, 5, 6]]), 1)
    with pytest.raises(Refusal, match="needs 4 .min_participants 3 . colluders 1"):
        policy(colluders=1).check_batches(spec_with([[1, 2, 3], [4, 5, 6]]), 1)
    policy().check_batches(spec_with([[1, 2, 3], [4, 5, 6]]), 1)
    with pytest.raises(Refusal, match="no pinned identity key"):
        SitePolicy(PolicyConfig(), {1: Identity.generate().public}).check_batches(spec_with([[1, 2, 3], [4, 5, 6]]), 1)


# -- one round, in process ---------------------------------------------------------------------------


def inputs(fed: Federation, rng) -> dict[int, np.ndarray]:
    return ring_inputs(fed.ids, fed.dim, rng)


def expected_sum(ring, ids, dim):
    total = np.zeros(dim + 1, dtype=np.uint32)
    for i in ids:
        total += ring[i]
    return total


@pytest.mark.parametrize("stage", ["advertise", "share", "masked_input"])
def test_a_batch_with_a_site_gone_before_its_input_is_left_out_whole(stage):
    fed = Federation(6, dim=5, min_clients=2, policy=POLICY2, batches=[[1, 2], [3, 4], [5, 6]])
    ring = inputs(fed, np.random.default_rng(0))
    server = fed.run(ring, {stage: {4}})
    assert server.stage is ServerStage.DONE, server.abort_reason
    assert server.result.survivors == [1, 2, 5, 6]
    assert np.array_equal(server.result.total, expected_sum(ring, [1, 2, 5, 6], 5))
    assert fed.refusals == {}


@pytest.mark.parametrize("stage", ["consistency", "unmask", "verify"])
def test_a_site_gone_after_its_input_leaves_the_round_unverified(stage):
    """Its input is in the sum but it cannot vouch for it: no sum comes out, and the retry is over
    whole batches again (SPEC §6.8)."""
    fed = Federation(6, dim=5, min_clients=2, policy=POLICY2, batches=[[1, 2], [3, 4], [5, 6]])
    ring = inputs(fed, np.random.default_rng(1))
    server = fed.run(ring, {stage: {4}})
    assert server.stage is ServerStage.ABORTED and server.abort_cause is AbortCause.UNVERIFIED, server.abort_reason
    assert server.result is None and "[4] did not vouch" in server.abort_reason


@st.composite
def batched_rounds(draw):
    n = draw(st.integers(4, 16))
    cuts = sorted(draw(st.sets(st.integers(2, n - 2), max_size=n // 2)))
    edges = [0, *[c for i, c in enumerate(cuts) if c - ([0, *cuts][i]) >= 2], n]
    batches = [list(range(a + 1, b + 1)) for a, b in zip(edges, edges[1:], strict=False) if b > a]
    if len(batches[-1]) < 2 and len(batches) > 1:
        batches[-2] += batches.pop()
    degree = draw(st.sampled_from([None, 2, 3])) if n >= 6 else None
    dropped = draw(st.sets(st.integers(1, n), max_size=3))
    at = {s: draw(st.sampled_from(STAGES)) for s in dropped}
    return n, batches, degree, at, draw(st.integers(1, 12))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batched_rounds(), st.integers(0, 2**32 - 1))
def test_a_completed_round_sums_exactly_the_whole_batches_alive_through_the_masked_input(scenario, seed):
    n, batches, degree, at, dim = scenario
    fed = Federation(n, dim=dim, degree=degree, min_clients=2, policy=POLICY2, batches=batches)
    ring = inputs(fed, np.random.default_rng(seed))
    drops: dict[str, set[int]] = {}
    for s, stage in at.items():
        drops.setdefault(stage, set()).add(s)
    server = fed.run(ring, drops)
    # An honest coordinator never asks for part of a batch; a group that a left-out batch took
    # below its threshold is refused as it would be after any drop.
    assert all(not r.startswith("batches") for r in fed.refusals.values()), fed.refusals
    before_input = {s for s, stage in at.items() if stage in ("advertise", "share", "masked_input")}
    expected = complete_batches(set(fed.ids) - before_input, batch_map(batches))
    if not at:
        assert server.stage is ServerStage.DONE, server.abort_reason
    if set(at) - before_input & set(expected):  # a survivor gone before it vouched: no sum comes out
        assert server.stage is ServerStage.ABORTED
    if server.stage is ServerStage.DONE:  # a drop may abort it (a group below its threshold), never bend it
        assert server.result.survivors == expected
        assert np.array_equal(server.result.total, expected_sum(ring, expected, dim))


def test_sites_refuse_part_of_a_batch_at_every_stage():
    """A coordinator running modified code asks for part of a batch: each stage's check refuses."""
    b = [[1, 2, 3], [4, 5, 6]]
    # participants
    fed = Federation(6, dim=3, min_clients=2, policy=POLICY2, batches=b)
    from asagiri.secagg.binding import RoundParams  # a round over part of batch {4, 5, 6}

    p = RoundParams.derive(run_id=fed.run_id, round=1, attempt=1, participants=[1, 2, 3, 4], secagg=fed.secagg,
                           params_digest=fed.params.params_digest, fit_config={}, vector_len=4,
                           spec_digest=fed.spec_digest)
    from asagiri.wire.messages import ConsistencyCheck, SecAggStart

    start = SecAggStart(1, 1, [1, 2, 3, 4], 4, p.plan.to_dict(), p.prg, p.degree, p.threshold)
    with pytest.raises(Refusal, match="batches: the participants hold part of a participation batch"):
        fed.clients[1].receive(start)
    # survivors: an honest start, then a survivor list that cuts batch {4, 5, 6}
    fed = Federation(6, dim=3, min_clients=2, policy=POLICY2, batches=b)
    ring = inputs(fed, np.random.default_rng(2))
    fed.advance(ring, ServerStage.CONSISTENCY)
    with pytest.raises(Refusal, match="batches: the survivors hold part"):
        fed.clients[1].receive(ConsistencyCheck(1, 1, [1, 2, 3, 4, 5]))


def test_every_site_masks_with_its_whole_batch_whatever_the_graph():
    """In a sparse graph batch-mates need not be neighbours: each site still masks with them (they
    are in the masked_with list it signs) and holds no shares of them."""
    from asagiri.wire.messages import ConsistencySig

    batches = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    fed = Federation(12, dim=3, degree=2, min_clients=2, policy=POLICY2, batches=batches)
    server = fed.run(inputs(fed, np.random.default_rng(3)))
    assert server.stage is ServerStage.DONE, server.abort_reason
    b = batch_map(batches)
    for site, msg in fed.sent:
        if isinstance(msg, ConsistencySig):
            assert b[site] - {site} <= set(msg.masked_with), (site, msg.masked_with)
            assert set(fed.clients[site]._round.held) <= {site, *server.nbrs[site]}
    assert any(not b[u] - {u} <= set(server.nbrs[u]) for u in fed.ids)  # the graph alone would not do it


def test_batches_cost_nothing_without_drops():
    """With every site present the batched round is the plain one: same survivors, same sum."""
    rng = np.random.default_rng(4)
    plain = Federation(6, dim=7, degree=2, min_clients=2, policy=POLICY2)
    batched = Federation(6, dim=7, degree=2, min_clients=2, policy=POLICY2, batches=[[1, 2, 3], [4, 5, 6]])
    ring = inputs(plain, rng)
    a, b = plain.run(ring), batched.run(ring)
    assert a.result.survivors == b.result.survivors == list(range(1, 7))
    assert np.array_equal(a.result.total, b.result.total)


# -- the run's colluders: every holder of a site's shares counts them (red-team finding) --------------


def test_a_site_assuming_more_colluders_than_the_run_refuses_it():
    with pytest.raises(Refusal, match="secagg_bounds: the run assumes 0 colluding sites, this site 2"):
        policy(colluders=2).check_run("r", spec_with([[1, 2, 3], [4, 5, 6]]).wire())
    policy(colluders=2).check_run("r", spec_with([[1, 2, 3], [4, 5, 6]], colluders=2).wire())


@pytest.mark.parametrize("run_colluders", [0, 2])
def test_two_colluders_cannot_certify_two_lists_when_the_run_counts_them(run_colluders):
    """Site 1 assumes 2 colluders; the sites holding its shares use the default policy.  With the
    quorum counted by each holder's own policy (``run_colluders`` 0, the control: what happened
    before the spec carried the number), colluders 6 and 7 sign two lists, one with site 1's batch
    (its neighbours reveal b shares) and one listing it dropped (others reveal key shares), and
    site 1's input comes out alone.  With the run's ``secagg.colluders: 2`` every holder needs
    the larger quorum, and the shares never reach the threshold."""
    from asagiri.secagg import shamir
    from asagiri.secagg.binding import spec_digest, survivors_message
    from asagiri.secagg.client import ClientStateMachine
    from asagiri.secagg.inmemory import LocalRound
    from asagiri.secagg.masking import add_masks, pair_seed, sign
    from asagiri.secagg.rules import spec_of
    from asagiri.wire.crypto import EphemeralKey
    from asagiri.wire.messages import ConsistencyCheck, ConsistencySig, MaskedInput, UnmaskRequest

    n, victim, colluding = 16, 1, {6, 7}
    batches = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    sa = SecAggConfig(mode="sparse", shares=7, batches=batches, colluders=run_colluders)
    ids = list(range(1, n + 1))
    keys = {i: Identity.generate() for i in ids}
    pubs = {i: k.public for i, k in keys.items()}

    def policy_of(i: int) -> PolicyConfig:
        return PolicyConfig(colluders=2) if i == victim else PolicyConfig()

    own = set(batches[0])
    spare = [v for v in ids if v not in own and v not in colluding]

    def camps(g, t):
        """Two camps of honest signers, each with enough of site 1's share holders (with the colluders)."""
        honest = [v for v in g[victim] if v not in colluding]
        for a in spare:
            for b in spare:
                one, two = own | {a, b}, set(spare) - {a, b}
                if (a < b and len([v for v in honest if v in one]) + 2 >= t and len([v for v in honest if v in two]) + 2 >= t
                        and all(len(({w} | set(g[w])) - own) >= t for w in two)):
                    return one, two
        return None

    # the coordinator grinds the round number (any FitIns config would do) for a graph it can use
    for rnd in range(1, 500):
        digest = spec_digest({"secagg": spec_of(sa)})
        clients = {i: ClientStateMachine(site_id=i, identity=keys[i], run_id="run", secagg=sa, spec_digest=digest,
                                         policy=SitePolicy(policy_of(i), pubs)) for i in ids}
        fed = LocalRound(ids=ids, dim=8, secagg=sa, identities=keys, run_id="run", rnd=rnd, min_clients=3,
                         clients=clients)
        ctx, t = fed.params.context, fed.params.threshold
        g = neighbours(ids, fed.params.degree, graph_seed(ctx, ids))
        if colluding <= set(g[victim]) and (found := camps(g, t)) is not None:
            camp1, camp2 = found
            break
    lists = {1: ids, 2: sorted(set(ids) - own)}
    ring = ring_inputs(ids, 8, np.random.default_rng(0))
    fed.advance(ring, ServerStage.CONSISTENCY)
    y = {s: m.vector["y"] for s, m in fed.sent if isinstance(m, MaskedInput)}
    sigs: dict[int, dict[int, ConsistencySig]] = {1: {}, 2: {}}
    for w in sorted(camp1 | camp2):
        k = 1 if w in camp1 else 2
        (sigs[k][w],) = fed.clients[w].receive(ConsistencyCheck(rnd, 1, lists[k]))
    for c in colluding:  # each colluder signs both lists
        mw = fed.clients[c]._round.masked_with
        for k in (1, 2):
            sigs[k][c] = ConsistencySig(rnd, 1, list(mw), keys[c].sign(survivors_message(ctx, lists[k], mw)))
    b_shares, s_shares = [], []
    for k, dropped in ((1, []), (2, sorted(own))):
        proof = [[s, m.masked_with, m.signature] for s, m in sigs[k].items()]
        for w in sorted(set(sigs[k]) - colluding):
            try:
                (resp,) = fed.clients[w].receive(UnmaskRequest(rnd, 1, lists[k], dropped, proof))
            except Refusal:
                continue
            b_shares += [s for o, s in resp.b_shares if o == victim]
            s_shares += [s for o, s in resp.s_shares if o == victim]
    for c in colluding:
        b, s = fed.clients[c]._round.held[victim]
        b_shares.append(b)
        s_shares.append(s)
    if run_colluders == 2:
        assert min(len(b_shares), len(s_shares)) < t  # refused: nothing of site 1 can be rebuilt
        return
    assert min(len(b_shares), len(s_shares)) >= t
    b = shamir.reconstruct([shamir.decode_share(x) for x in b_shares[:t]], t)
    s_key = EphemeralKey(shamir.reconstruct([shamir.decode_share(x) for x in s_shares[:t]], t))
    r = fed.clients[victim]._round
    x = y[victim].copy()
    add_masks(x, None, [(-1, b)] + [(-sign(victim, v), pair_seed(s_key, r.peer_keys[v][1], victim, v, ctx))
                                    for v in r.masked_with], prg=fed.params.prg)
    assert np.array_equal(x, ring[victim])  # the control: site 1's input alone


def test_a_run_cannot_assume_more_colluders_than_its_rounds_can_outvote():
    """Red-team finding: with colluders >= n the quorum exceeds the participants, and every attempt
    aborted after every site had trained; the config refuses it."""
    with pytest.raises(ValueError, match="colluders at most min_clients - 2"):
        FederationConfig.model_validate({"min_clients": 3, "secagg": {"colluders": 2}})
    FederationConfig.model_validate({"min_clients": 4, "secagg": {"colluders": 2}})


def test_the_coordinator_selects_whole_available_batches_only():
    from asagiri.strategy.selection import NotEnoughSites, select_clients, usable_sites

    batches = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    everyone = select_clients(list(range(1, 10)), rnd=1, attempt=1, policy="all", min_clients=3, batches=batches)
    assert everyone == list(range(1, 10))
    # site 5 is away: its batch cannot take part, the others can
    assert usable_sites([1, 2, 3, 4, 6, 7, 8, 9], batches) == [1, 2, 3, 7, 8, 9]
    some = select_clients([1, 2, 3, 4, 6, 7, 8, 9], rnd=2, attempt=1, policy="fraction", fraction=0.3, min_clients=3,
                          batches=batches)
    assert some in ([1, 2, 3], [7, 8, 9])
    for rnd in range(1, 20):
        chosen = select_clients(list(range(1, 10)), rnd=rnd, attempt=1, policy="range", min_clients=3,
                                max_per_round=6, batches=batches)
        assert is_union_of_batches(chosen, batch_map(batches)) and 3 <= len(chosen) <= 6
    with pytest.raises(NotEnoughSites, match="whole participation batches"):
        select_clients([1, 2, 4, 5, 7, 8], rnd=1, attempt=1, policy="all", min_clients=3, batches=batches)
