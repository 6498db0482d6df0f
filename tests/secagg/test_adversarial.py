"""A coordinator that deviates from the protocol, in memory: every attack is refused by the site,
and what the coordinator is left holding recovers no sum over fewer than ``min_participants``
sites.  ``adversary.unmaskable`` is the judge; ``test_the_judge_sees_a_leak_the_policy_allows``
shows it finds one when a site's policy lets one through.  The same attacks against real site
processes are in ``test_malicious_coordinator.py``."""

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asagiri.config import PolicyConfig
from asagiri.policy import Refusal
from asagiri.secagg import rules, shamir
from asagiri.secagg.binding import params_digest, survivors_message
from asagiri.secagg.client import ClientStage
from asagiri.secagg.graph import graph_seed, neighbours
from asagiri.secagg.masking import pair_seed, sign
from asagiri.secagg.prg import expand
from asagiri.secagg.server import ServerStage
from asagiri.wire.crypto import EphemeralKey
from asagiri.wire.messages import (
    ConsistencyCheck,
    FitIns,
    KeyRoster,
    SecAggStart,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)

from .adversary import Deviation, attack, honest_deviation, unmaskable
from .harness import Federation
from .harness import ring_inputs as bounded_inputs

DIM = 64
STRICT = PolicyConfig(min_participants=3, min_group=2)


def ring_inputs(fed):
    rng = np.random.default_rng(7)
    return bounded_inputs(fed.ids, fed.dim, rng)


def to_site(queue, site, kind):
    return next(o.msg for o in queue if o.site == site and isinstance(o.msg, kind))


def refused(rule):
    return pytest.raises(Refusal, match=f"^{rule}: ")


# ---- attack 1: isolation by selective delivery -----------------------------------------------------


def neighbour_of(fed, site):
    return neighbours(fed.ids, fed.params.degree or None, graph_seed(fed.params.context, fed.ids))[site][0]


def isolate(fed, target, partners, *, declare_dropped=True):
    """Deliver to ``target`` only ``partners``' shares (and to each partner only the others'), then
    call the partners dropped so that their masking keys would be revealed."""
    dev = honest_deviation(fed)
    group = {target, *partners}
    for u in group:
        dev.deliver[u] = group - {u}
    if declare_dropped:
        dev.lists = [[u for u in fed.ids if u not in partners]]
        dev.assign = {u: 0 for u in fed.ids if u not in partners}
        dev.dropped = {u: sorted(partners) for u in fed.ids}
    return dev


def test_isolation_by_selective_delivery_is_refused_and_recovers_nothing():
    # The demo's layout: three sites, complete graph, t = 2.
    fed = Federation(3, dim=DIM, policy=STRICT)
    inputs = ring_inputs(fed)
    out = attack(fed, isolate(fed, 1, {2}), inputs)
    assert out.refusals[1].startswith("min_participants: 2 survivors") or out.refusals[1].startswith("min_participants")
    assert 1 in out.masked  # it did mask (with site 2 only) before the survivor list came
    assert unmaskable(fed, out, below=3) == []
    # What the coordinator holds of site 1: y_1. Without b_1 it cannot strip the self mask.
    assert len(out.revealed_b.get(1, ())) < fed.params.threshold


def isolate_pair(fed):
    """Sites a and b mask only with each other; their other neighbours are called dropped, so the
    survivor list is consistent with what each of them masked with."""
    graph = neighbours(fed.ids, fed.params.degree or None, graph_seed(fed.params.context, fed.ids))
    a, b = 1, graph[1][0]
    dev = isolate(fed, a, {b}, declare_dropped=False)
    gone = (set(graph[a]) | set(graph[b])) - {a, b}
    dev.lists = [[u for u in fed.ids if u not in gone]]
    dev.assign = {u: 0 for u in dev.lists[0]}
    dev.dropped = {u: sorted(gone) for u in fed.ids}
    return a, b, dev


def test_a_pair_masked_only_with_each_other_is_refused():
    fed = Federation(6, dim=DIM, degree=2, threshold=2, policy=STRICT)
    a, b, dev = isolate_pair(fed)
    out = attack(fed, dev, ring_inputs(fed))
    assert out.refusals[a].startswith("component: ") and out.refusals[b].startswith("component: ")
    assert unmaskable(fed, out, below=3) == []
    # Told the truth instead (its other neighbour survived), a site refuses the list outright.
    fed = Federation(6, dim=DIM, degree=2, threshold=2, policy=STRICT)
    out = attack(fed, isolate(fed, 1, {neighbour_of(fed, 1)}, declare_dropped=False), ring_inputs(fed))
    assert "never shared keys" in out.refusals[1]
    assert unmaskable(fed, out, below=3) == []


def test_the_judge_sees_a_leak_the_policy_allows():
    """The same pair isolation against sites whose policy accepts sums over two: the coordinator
    unmasks y_a + y_b, and the judge reports exactly that pair. So the judge can fail."""
    fed = Federation(6, dim=DIM, degree=2, threshold=2, policy=PolicyConfig(min_participants=2, min_group=2))
    a, b, dev = isolate_pair(fed)
    inputs = ring_inputs(fed)
    out = attack(fed, dev, inputs)
    assert a not in out.refusals and b not in out.refusals
    assert tuple(sorted((a, b))) in unmaskable(fed, out, below=3)
    # And really: with the b shares they revealed, y_a + y_b minus both self masks is x_a + x_b.
    seeds = {}
    for owner in (a, b):
        shares = [shamir.decode_share(sh) for s, m in fed.sent if isinstance(m, UnmaskResponse)
                  for o, sh in m.b_shares if o == owner]
        seeds[owner] = shamir.reconstruct(shares, fed.params.threshold)
    total = out.masked[a] + out.masked[b] - expand(seeds[a], DIM + 1) - expand(seeds[b], DIM + 1)
    assert np.array_equal(total, inputs[a] + inputs[b])


def test_isolation_in_a_sparse_graph_with_signatures_from_outside_the_group_is_refused():
    """Seven sites in a ring of degree 2: site 1 masks only with one neighbour, which is then called
    dropped; every other site signs the survivor list, so a quorum of valid signatures exists."""
    for partners in ("one", "all"):
        fed = Federation(7, dim=DIM, degree=2, threshold=2, policy=STRICT)
        graph = neighbours(fed.ids, 2, graph_seed(fed.params.context, fed.ids))
        partner = graph[1][0]
        dev = isolate(fed, 1, {partner})
        if partners == "all":  # also call the other neighbour dropped, so the list is consistent
            gone = set(graph[1])
            dev.lists = [[u for u in fed.ids if u not in gone]]
            dev.assign = {u: 0 for u in dev.lists[0]}
            dev.dropped = {u: sorted(gone) for u in fed.ids}
        out = attack(fed, dev, ring_inputs(fed))
        assert out.refusals[1].startswith("survivors: "), out.refusals
        assert unmaskable(fed, out, below=3) == []


# ---- attack 2: per-site round parameters -----------------------------------------------------------


def test_a_plan_other_than_the_one_the_site_derives_is_refused():
    fed = Federation(3, dim=DIM, policy=STRICT)
    start = to_site(fed.server.start(), 1, SecAggStart)
    for quant in ({**start.quant, "clip": 0.0}, {**start.quant, "max_samples": 1}, {**start.quant, "scale": "x"},
                  {**start.quant, "bits": 32.0}, {k: v for k, v in start.quant.items() if k != "scale"}):
        fed = Federation(3, dim=DIM, policy=STRICT)
        with refused("round_params"):
            fed.clients[1].receive(dataclasses.replace(start, quant=quant))
        assert fed.clients[1].stage is ClientStage.ABORTED


def test_a_different_global_model_for_one_site_fails_every_signature():
    # Site 3 is sent another global model than sites 1 and 2.
    fed = Federation(3, dim=DIM, policy=STRICT, fit_for={3: FitIns(1, 1, {"w": np.ones(DIM, np.float32)}, {})})
    out = attack(fed, honest_deviation(fed), ring_inputs(fed))
    # Site 3 signed another round digest: 1 and 2 reject its advertisement, and 3 rejects theirs.
    assert {s: r.split(":")[0] for s, r in out.refusals.items()} == {1: "signature", 2: "signature", 3: "signature"}
    assert out.masked == {}


def test_a_different_training_spec_for_one_site_fails_every_signature():
    fed = Federation(3, dim=DIM, policy=STRICT)
    fed.clients[2].spec_digest = b"\1" * 32  # site 2 was sent another Welcome spec
    out = attack(fed, honest_deviation(fed), ring_inputs(fed))
    assert {s: r.split(":")[0] for s, r in out.refusals.items()} == {1: "signature", 2: "signature", 3: "signature"}
    assert out.masked == {}


# ---- attack 3: a round of one ------------------------------------------------------------------------


def test_a_round_of_one_is_refused_at_every_stage():
    fed = Federation(3, dim=DIM, policy=STRICT)
    start = to_site(fed.server.start(), 1, SecAggStart)
    with refused("min_participants"):
        fed.clients[1].receive(dataclasses.replace(start, participants=[1], threshold=1))
    # Participants [1, 2, 3], but the roster says only site 1 advertised.
    fed = Federation(3, dim=DIM, policy=STRICT)
    fed.clients[1].receive(to_site(fed.server.start(), 1, SecAggStart))
    with refused("min_participants"):
        fed.clients[1].receive(KeyRoster(1, 1, [1], []))
    # Survivors padded with a made-up id.
    fed = Federation(3, dim=DIM, policy=STRICT)
    queue = fed.advance(ring_inputs(fed), ServerStage.CONSISTENCY)
    with refused("survivors"):
        fed.clients[1].receive(dataclasses.replace(to_site(queue, 1, ConsistencyCheck), survivors=[1, 2, 999]))


def test_the_coordinator_cannot_choose_the_group_or_the_threshold():
    fed = Federation(9, dim=DIM, policy=STRICT)  # the spec says: complete graph, majority threshold
    start = to_site(fed.server.start(), 1, SecAggStart)
    assert (start.degree, start.threshold) == (0, 5)
    for degree, threshold in ((2, 2), (0, 1), (8, 4)):
        fed = Federation(9, dim=DIM, policy=STRICT)
        with refused("round_params"):
            fed.clients[1].receive(dataclasses.replace(start, degree=degree, threshold=threshold))
    # A spec whose groups are smaller than this site's policy allows.
    fed = Federation(9, dim=DIM, degree=1, threshold=2, policy=PolicyConfig(min_group=3))
    with refused("min_group"):
        fed.clients[1].receive(to_site(fed.server.start(), 1, SecAggStart))


# ---- what was refused before, still refused ------------------------------------------------------------


def test_forged_key_advertisement_is_refused_before_any_share_leaves():
    fed = Federation(4, dim=DIM)
    queue = fed.advance(ring_inputs(fed), ServerStage.SHARE)
    roster = to_site(queue, 1, KeyRoster)
    mitm = EphemeralKey.generate()
    entries = [[v, mitm.public, mitm.public, sig] if v == 2 else [v, c, s, sig] for v, c, s, sig in roster.entries]
    with refused("signature"):
        fed.clients[1].receive(dataclasses.replace(roster, entries=entries))
    assert fed.clients[1].stage is ClientStage.ABORTED
    with refused("stage"):
        fed.clients[1].receive(to_site(queue, 1, KeyRoster))


def test_roster_missing_a_neighbour_is_refused():
    fed = Federation(5, dim=DIM)
    roster = to_site(fed.advance(ring_inputs(fed), ServerStage.SHARE), 1, KeyRoster)
    with refused("stage"):
        fed.clients[1].receive(dataclasses.replace(roster, entries=roster.entries[1:]))


def test_asking_a_live_site_for_both_share_kinds_is_refused():
    fed = Federation(4, dim=DIM)
    inputs = ring_inputs(fed)
    queue = fed.advance(inputs, ServerStage.UNMASK)
    honest = to_site(queue, 1, UnmaskRequest)
    with refused("survivors"):
        fed.clients[1].receive(dataclasses.replace(honest, dropped=[2]))  # 2 survived

    fed = Federation(4, dim=DIM)
    inputs = ring_inputs(fed)
    queue = fed.advance(inputs, ServerStage.UNMASK)
    honest = to_site(queue, 1, UnmaskRequest)
    [first] = fed.clients[1].receive(honest)
    assert isinstance(first, UnmaskResponse) and {o for o, _ in first.b_shares} >= {2}
    with refused("stage"):
        fed.clients[1].receive(dataclasses.replace(honest, survivors=[1, 3, 4], dropped=[2]))
    # All the coordinator can gather this way is site 2's b shares: its pairwise masks stay on.
    b_shares = []
    for site in (1, 3, 4):
        [resp] = [first] if site == 1 else fed.clients[site].receive(to_site(queue, site, UnmaskRequest))
        b_shares += [shamir.decode_share(sh) for o, sh in resp.b_shares if o == 2]
        assert not [o for o, _ in resp.s_shares if o == 2]
    b2 = shamir.reconstruct(b_shares, fed.server.threshold)
    y2 = next(m.vector["y"] for s, m in fed.sent if s == 2 and type(m).__name__ == "MaskedInput")
    assert not np.array_equal(y2 - expand(b2, DIM + 1), inputs[2])


def test_inconsistent_survivor_lists_are_refused():
    fed = Federation(4, dim=DIM)
    queue = fed.advance(ring_inputs(fed), ServerStage.CONSISTENCY)
    told_1 = dataclasses.replace(to_site(queue, 1, ConsistencyCheck), survivors=[1, 2, 3])
    fed.clients[1].receive(told_1)
    for site in (2, 3, 4):
        fed.server.receive(site, fed.clients[site].receive(to_site(queue, site, ConsistencyCheck))[0])
    req = UnmaskRequest(1, 1, [1, 2, 3, 4], [], [[s, [], b"\0" * 64] for s in (2, 3, 4)])
    with refused("survivors"):
        fed.clients[1].receive(req)


def test_survivor_list_without_a_quorum_of_valid_signatures_is_refused():
    fed = Federation(5, dim=DIM)
    queue = fed.advance(ring_inputs(fed), ServerStage.CONSISTENCY)
    check = to_site(queue, 1, ConsistencyCheck)
    fed.clients[1].receive(check)
    with refused("signature"):
        fed.clients[1].receive(UnmaskRequest(1, 1, check.survivors, [], [[2, [1, 3], b"\1" * 64]]))
    fed = Federation(5, dim=DIM)
    queue = fed.advance(ring_inputs(fed), ServerStage.CONSISTENCY)
    sigs = {s: fed.clients[s].receive(to_site(queue, s, ConsistencyCheck))[0] for s in (1, 2)}
    with refused("quorum"):  # two of five participants signed; three are needed
        fed.clients[1].receive(UnmaskRequest(1, 1, check.survivors, [], [[2, sigs[2].masked_with, sigs[2].signature]]))


def test_replayed_messages_from_an_earlier_round_are_refused():
    fed1 = Federation(4, dim=DIM)
    inputs = ring_inputs(fed1)
    fed1.run(inputs)
    old_start = fed1.server.start()[0].msg
    earlier = Federation(4, dim=DIM, identities=fed1.identities)
    old_roster = to_site(earlier.advance(inputs, ServerStage.SHARE), 2, KeyRoster)
    # Round 2 with the same site machines, which remember round 1.
    fed2 = Federation(4, dim=DIM, identities=fed1.identities, rnd=2, clients=fed1.clients)
    fed2.advance(inputs, ServerStage.SHARE)
    assert isinstance(old_start, SecAggStart) and old_start.round == 1
    with refused("replay"):
        fed2.clients[1].receive(FitIns(1, 1, {"w": np.zeros(DIM, np.float32)}, {}))  # the old FitIns
    with pytest.raises(Refusal):
        fed2.clients[1].receive(old_start)
    with refused("stage"):
        fed2.clients[3].receive(old_roster)
    with refused("signature"):  # relabelled as round 2, the old keys sign another round digest
        fed2.clients[2].receive(dataclasses.replace(old_roster, round=2))
    assert all(fed2.clients[i].stage is ClientStage.ABORTED for i in (1, 2, 3))


def test_an_unknown_mask_prg_is_refused_before_any_key_is_made():
    fed = Federation(3, dim=DIM)
    start = next(o.msg for o in fed.server.start() if o.site == 1)
    with refused("round_params"):
        fed.clients[1].receive(dataclasses.replace(start, prg="rc4"))
    assert fed.clients[1].stage is ClientStage.ABORTED and fed.clients[1].round_key is None


def test_a_nan_update_is_refused_and_the_site_leaves_the_round():
    fed = Federation(3, dim=DIM)
    queue = fed.advance({}, ServerStage.MASKED_INPUT)
    assert fed.clients[1].receive(to_site(queue, 1, ShareDelivery)) == []
    bad = np.zeros(DIM, dtype=np.float32)
    bad[5] = np.nan
    with refused("malformed"):
        fed.clients[1].set_input(bad, 10, trained_on=(fed.params.params_digest, {}))
    assert fed.clients[1].stage is ClientStage.ABORTED


# ---- a site colluding with the coordinator ---------------------------------------------------------------


def colluding_split(colluders: int):
    """Site 5 works with the coordinator (it hands over its identity key and its shares). Sites 1-2
    are told everyone survived, sites 3-4 that site 1 dropped, and site 5 signs both lists."""
    fed = Federation(5, dim=DIM, policy=PolicyConfig(min_participants=3, colluders=colluders))
    inputs = ring_inputs(fed)
    fed.advance(inputs, ServerStage.CONSISTENCY)
    ctx, traitor = fed.params.context, fed.clients[5]._round
    lists = {1: fed.ids, 2: fed.ids, 3: [2, 3, 4, 5], 4: [2, 3, 4, 5]}
    sigs = {u: fed.clients[u].receive(ConsistencyCheck(1, 1, lists[u]))[0] for u in lists}
    responses, refusals = {}, {}
    for u, survivors in lists.items():
        forged = fed.identities[5].sign(survivors_message(ctx, survivors, traitor.masked_with))
        proof = [[v, sigs[v].masked_with, sigs[v].signature] for v in lists if lists[v] == survivors]
        proof.append([5, traitor.masked_with, forged])
        dropped = sorted(set(fed.ids) - set(survivors))
        try:
            [responses[u]] = fed.clients[u].receive(UnmaskRequest(1, 1, survivors, dropped, proof))
        except Refusal as exc:
            refusals[u] = exc.rule
    b = [shamir.decode_share(sh) for r in responses.values() for o, sh in r.b_shares if o == 1]
    s = [shamir.decode_share(sh) for r in responses.values() for o, sh in r.s_shares if o == 1]
    b.append(shamir.decode_share(traitor.held[1][0]))
    s.append(shamir.decode_share(traitor.held[1][1]))
    return fed, inputs, b, s, refusals


def test_control_a_colluding_site_that_signs_two_lists_breaks_a_quorum_that_assumes_none(monkeypatch):
    """The attack, shown to work where the rule allows it: with a plain majority quorum one
    colluder gets both lists certified, and the coordinator gets site 1's seed *and* its masking
    key, so site 1's input comes out exactly."""
    monkeypatch.setattr(rules, "SIGNING_COLLUDERS", 0)
    fed, inputs, b, s, refusals = colluding_split(colluders=0)
    t = fed.params.threshold
    assert refusals == {} and len(b) >= t and len(s) >= t
    y1 = next(m.vector["y"] for u, m in fed.sent if u == 1 and type(m).__name__ == "MaskedInput")
    key = EphemeralKey(shamir.reconstruct(s, t))
    x1 = y1 - expand(shamir.reconstruct(b, t), DIM + 1)
    for v in fed.clients[1]._round.masked_with:
        mask = expand(pair_seed(key, fed.clients[v]._round.s.public, 1, v, fed.params.context), DIM + 1)
        x1 = x1 - mask if sign(1, v) > 0 else x1 + mask
    assert np.array_equal(x1, inputs[1])


def test_the_default_quorum_survives_one_colluder():
    """The default policy (``colluders: 0``) still counts one colluding signer in the quorum
    (issue 26, attack 4): both lists are refused, and the coordinator holds only the colluder's
    own shares of site 1's secrets, fewer than the threshold."""
    fed, _, b, s, refusals = colluding_split(colluders=0)
    assert refusals == {1: "quorum", 2: "quorum", 3: "quorum", 4: "quorum"}  # 3 signatures, 4 needed
    assert len(b) == len(s) == 1 < fed.params.threshold


def test_a_site_that_assumes_one_colluder_refuses_both_lists():
    fed, _, b, s, refusals = colluding_split(colluders=1)
    assert refusals == {1: "quorum", 2: "quorum", 3: "quorum", 4: "quorum"}  # 3 signatures, 4 needed
    assert len(b) == len(s) == 1  # only the colluder's own


def bridge(policy):
    """Twelve sites, groups of 5, t = 3. Sites 11 and 12 collude: the coordinator picks an attempt
    that puts both in site 1's group, delivers site 1 only their shares, and calls its honest
    neighbours dropped, so everything site 1 checks is consistent."""
    for attempt in range(1, 1000):
        fed = Federation(12, dim=8, degree=4, threshold=3, attempt=attempt, policy=policy)
        graph = neighbours(fed.ids, 4, graph_seed(fed.params.context, fed.ids))
        if {11, 12} <= set(graph[1]):
            break
    dev = honest_deviation(fed)
    dev.deliver[1] = {11, 12}
    gone = set(graph[1]) - {11, 12}
    dev.lists = [[u for u in fed.ids if u not in gone]]
    dev.assign = {u: 0 for u in dev.lists[0]}
    dev.dropped = {u: sorted(gone) for u in fed.ids}
    return fed, attack(fed, dev, ring_inputs(fed))


def test_colluders_next_to_a_site_do_not_make_its_component_count():
    """Counted naively, site 1's component is large, but every mask on its input is one the
    coordinator can compute with the colluders' keys. A site assuming two colluders refuses
    (found in review)."""
    fed, out = bridge(PolicyConfig(min_participants=3, colluders=2, min_group=3))
    assert out.refusals[1].startswith("component: without sites")
    assert unmaskable(fed, out, below=3, colluders=frozenset({11, 12})) == []


def test_the_judge_counts_what_colluders_hand_over():
    """The same attack on a site that assumes no colluders: it answers, and the judge, told who
    colluded, finds site 1's input alone."""
    fed, out = bridge(PolicyConfig(min_participants=3, min_group=3))
    assert 1 not in out.refusals
    assert (1,) in unmaskable(fed, out, below=3, colluders=frozenset({11, 12}))


def test_a_second_fitins_for_the_same_round_is_refused():
    """Trained on one model, signed over another (found in review): a second FitIns for a round
    attempt is refused, and an update trained on anything but the signed model is too."""
    fed = Federation(3, dim=DIM, policy=STRICT)
    with refused("replay"):
        fed.clients[1].receive(FitIns(1, 1, {"w": np.ones(DIM, np.float32)}, {}))
    fed = Federation(3, dim=DIM, policy=STRICT)
    queue = fed.advance({}, ServerStage.MASKED_INPUT)
    fed.clients[1].receive(to_site(queue, 1, ShareDelivery))
    other = (params_digest({"w": np.ones(DIM, np.float32)}), {})
    with refused("round_params"):
        fed.clients[1].set_input(np.zeros(DIM, np.float32), 10, trained_on=other)
    fed.clients[2].receive(to_site(queue, 2, ShareDelivery))
    signed = (fed.params.params_digest, {})
    assert fed.clients[2].set_input(np.zeros(DIM, np.float32), 10, trained_on=signed)


# ---- the property: a coordinator deviating everywhere at once --------------------------------------------


@st.composite
def rounds(draw):
    n = draw(st.integers(3, 7))
    m = draw(st.integers(2, min(3, n)))
    sparse = n >= 5 and draw(st.booleans())
    degree = draw(st.integers(2, n - 2)) if sparse else None
    group = n if degree is None else degree + 1
    threshold = draw(st.integers(max(2, group // 2 + 1), group))
    ids = list(range(1, n + 1))

    def subset(containing=None):
        chosen = set(draw(st.sets(st.sampled_from(ids))))
        return sorted(chosen | ({containing} if containing else set()))

    kind = draw(st.sampled_from(["honest", "random"]))
    honest = kind == "honest"
    views = {u: (ids if honest or draw(st.booleans()) else subset(u)) for u in ids}
    deliver = {u: set(ids if honest or draw(st.booleans()) else subset()) for u in ids}
    lists = [ids if honest else subset(), subset()]
    assign = {u: draw(st.integers(0, 1)) for u in ids}
    dropped = {u: ([] if honest else subset()) for u in ids}
    return n, m, degree, threshold, Deviation(views, deliver, lists, assign, dropped)


def target_isolation(fed, dev, target):
    """The strongest shape found by hand: a small set masks only within itself, and everyone around
    it is called dropped, so the survivor list is consistent with what its signers masked with."""
    graph = neighbours(fed.ids, fed.params.degree or None, graph_seed(fed.params.context, fed.ids))
    start, size = target
    target, frontier = {start}, [start]
    while frontier and len(target) < size:  # a connected set of ``size`` sites around ``start``
        for v in graph[frontier.pop(0)]:
            if len(target) < size and v not in target:
                target.add(v)
                frontier.append(v)
    around = set().union(*(graph[u] for u in target)) - target
    dev.views = {u: list(fed.ids) for u in fed.ids}
    for u in target:
        dev.deliver[u] = target - {u}
    dev.lists[0] = [u for u in fed.ids if u not in around]
    dev.assign = {u: 0 for u in fed.ids}
    dev.dropped = {u: sorted(around) for u in fed.ids}


def judge(n, m, degree, threshold, dev, target=None):
    fed = Federation(n, dim=8, degree=degree, threshold=threshold,
                     policy=PolicyConfig(min_participants=m, min_group=2))
    if target:
        target_isolation(fed, dev, target)
    rng = np.random.default_rng(0)
    inputs = bounded_inputs(fed.ids, 8, rng)
    outcome = attack(fed, dev, inputs)
    return unmaskable(fed, outcome, below=m)


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(rounds())
def test_whatever_the_coordinator_does_it_unmasks_no_sum_over_fewer_than_min_participants(scenario):
    assert judge(*scenario) == []


@st.composite
def cut_outs(draw):
    """Sparse rounds in which the coordinator cuts a small connected set out of the graph."""
    n = draw(st.integers(5, 9))
    m = draw(st.integers(3, 4))
    degree = draw(st.integers(2, min(4, n - 2)))
    threshold = draw(st.integers(max(2, (degree + 1) // 2 + 1), degree + 1))
    ids = list(range(1, n + 1))
    dev = Deviation({u: ids for u in ids}, {u: set(ids) for u in ids}, [ids, []], {}, {})
    return n, m, degree, threshold, dev, (draw(st.sampled_from(ids)), draw(st.integers(1, m - 1)))


@PROPERTY
@given(cut_outs())
def test_a_set_cut_out_of_the_graph_stays_masked(scenario):
    assert judge(*scenario) == []


def test_a_component_made_only_of_possible_colluders_does_not_count():
    """Found in review: with colluders >= the other members of the component there was no removal
    set to try, and the check passed. Every member but the site could be a colluder: refuse."""
    from asagiri.secagg.component import component_survives

    star = {1: {10, 11}, 10: {1}, 11: {1}}
    assert component_survives(1, star, needed=3, colluders=3)[0] is False
    assert component_survives(1, star, needed=3, colluders=2)[0] is False
    assert component_survives(1, star, needed=3, colluders=0)[0] is True
    ring = {u: {(u % 6) + 1, ((u - 2) % 6) + 1} for u in range(1, 7)}  # 1-2-3-4-5-6-1
    assert component_survives(1, ring, needed=3, colluders=1)[0] is True  # any one cut leaves a path of 5
    ok, why = component_survives(1, ring, needed=3, colluders=2)
    assert not ok and why.startswith("without sites [2, 5]")  # site 1 is left with site 6 only


def test_a_refused_fitins_does_not_reopen_the_round_attempt():
    """Found in review: refusing a second FitIns forgot the first, so a third was accepted."""
    fed = Federation(3, dim=DIM, policy=STRICT)
    with refused("replay"):
        fed.clients[1].receive(FitIns(1, 1, {"w": np.ones(DIM, np.float32)}, {}))
    with refused("replay"):
        fed.clients[1].receive(FitIns(1, 1, {"w": np.full(DIM, 2, np.float32)}, {}))
    with refused("stage"):  # and no SecAggStart for it goes ahead either
        fed.clients[1].receive(to_site(fed.server.start(), 1, SecAggStart))
