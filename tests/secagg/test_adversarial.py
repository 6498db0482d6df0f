"""A coordinator that deviates from the protocol: every attack is refused by the site, and what
the coordinator is left holding does not recover any single site's input."""

import dataclasses

import numpy as np
import pytest

from asagiri.secagg import shamir
from asagiri.secagg.client import ClientStage, SecAggRefused
from asagiri.secagg.prg import expand
from asagiri.secagg.server import ServerStage
from asagiri.wire.crypto import EphemeralKey
from asagiri.wire.messages import (
    ConsistencyCheck,
    KeyRoster,
    SecAggStart,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)

from .harness import Federation

DIM = 64


def ring_inputs(fed):
    rng = np.random.default_rng(7)
    return {i: rng.integers(0, 2**32, DIM + 1, dtype=np.uint64).astype(np.uint32) for i in fed.ids}


def to_site(queue, site, kind):
    return next(o.msg for o in queue if o.site == site and isinstance(o.msg, kind))


def test_forged_key_advertisement_is_refused_before_any_share_leaves():
    fed = Federation(4, dim=DIM)
    queue = fed.advance(ring_inputs(fed), ServerStage.SHARE)
    roster = to_site(queue, 1, KeyRoster)
    # The coordinator substitutes its own keys for site 2's (a man in the middle), keeping 2's signature.
    mitm = EphemeralKey.generate()
    entries = [[v, mitm.public, mitm.public, sig] if v == 2 else [v, c, s, sig] for v, c, s, sig in roster.entries]
    with pytest.raises(SecAggRefused, match="site 2's key advertisement does not verify"):
        fed.clients[1].receive(dataclasses.replace(roster, entries=entries))
    assert fed.clients[1].stage is ClientStage.ABORTED
    # Nothing was shared: the coordinator holds no share of site 1's secrets, and site 1 says no more.
    with pytest.raises(SecAggRefused):
        fed.clients[1].receive(to_site(queue, 1, KeyRoster))


def test_roster_missing_a_neighbour_or_with_a_low_threshold_is_refused():
    fed = Federation(5, dim=DIM)
    queue = fed.advance(ring_inputs(fed), ServerStage.SHARE)
    roster = to_site(queue, 1, KeyRoster)
    with pytest.raises(SecAggRefused, match="not exactly"):
        fed.clients[1].receive(dataclasses.replace(roster, entries=roster.entries[1:]))
    fed2 = Federation(5, dim=DIM)
    roster2 = to_site(fed2.advance(ring_inputs(fed2), ServerStage.SHARE), 1, KeyRoster)
    with pytest.raises(SecAggRefused, match="threshold 1"):
        fed2.clients[1].receive(dataclasses.replace(roster2, threshold=1))


def test_asking_a_live_site_for_both_share_kinds_is_refused():
    fed = Federation(4, dim=DIM)
    inputs = ring_inputs(fed)
    queue = fed.advance(inputs, ServerStage.UNMASK)
    honest = to_site(queue, 1, UnmaskRequest)
    # Site 2 survived, but the coordinator also lists it as dropped to get its masking key share.
    greedy = dataclasses.replace(honest, dropped=[2])
    with pytest.raises(SecAggRefused, match="overlap"):
        fed.clients[1].receive(greedy)

    # Or: ask honestly first (b shares), then again calling site 2 dropped.
    fed = Federation(4, dim=DIM)
    inputs = ring_inputs(fed)
    queue = fed.advance(inputs, ServerStage.UNMASK)
    honest = to_site(queue, 1, UnmaskRequest)
    [first] = fed.clients[1].receive(honest)
    assert isinstance(first, UnmaskResponse) and {o for o, _ in first.b_shares} >= {2}
    second = dataclasses.replace(honest, survivors=[1, 3, 4], dropped=[2])
    with pytest.raises(SecAggRefused):
        fed.clients[1].receive(second)

    # What the coordinator could gather from *every* site this way: b shares of site 2 only. It
    # can strip site 2's self mask, but its pairwise masks stay: site 2's input is not recovered.
    b_shares, s_shares = [], []
    for site in (1, 3, 4):
        req = to_site(queue, site, UnmaskRequest)
        [resp] = fed.clients[site].receive(req) if site != 1 else [first]
        b_shares += [shamir.decode_share(sh) for o, sh in resp.b_shares if o == 2]
        s_shares += [shamir.decode_share(sh) for o, sh in resp.s_shares if o == 2]
    assert s_shares == []
    b2 = shamir.reconstruct(b_shares, fed.server.threshold)
    y2 = next(m.vector["y"] for s, m in fed.sent if s == 2 and type(m).__name__ == "MaskedInput")
    attempt = y2 - expand(b2, DIM + 1)
    assert not np.array_equal(attempt, inputs[2])


def test_inconsistent_survivor_lists_are_refused():
    fed = Federation(4, dim=DIM)
    queue = fed.advance(ring_inputs(fed), ServerStage.CONSISTENCY)
    # Site 1 is told the survivors are [1, 2, 3]; the others [1, 2, 3, 4].
    told_1 = dataclasses.replace(to_site(queue, 1, ConsistencyCheck), survivors=[1, 2, 3])
    [sig1] = fed.clients[1].receive(told_1)
    for site in (2, 3, 4):
        fed.server.receive(site, fed.clients[site].receive(to_site(queue, site, ConsistencyCheck))[0])
    # The coordinator now asks site 1 to unmask for [1, 2, 3, 4]: not the list it signed.
    req = UnmaskRequest(1, 1, [1, 2, 3, 4], [], [[s, b"\0" * 64] for s in (2, 3, 4)])
    with pytest.raises(SecAggRefused, match="differs from the one this site signed"):
        fed.clients[1].receive(req)


def test_survivor_list_without_enough_valid_signatures_is_refused():
    fed = Federation(4, dim=DIM)
    queue = fed.advance(ring_inputs(fed), ServerStage.CONSISTENCY)
    sig = fed.clients[1].receive(to_site(queue, 1, ConsistencyCheck))[0].signature
    survivors = to_site(queue, 1, ConsistencyCheck).survivors
    forged = [[1, sig], [2, b"\1" * 64], [3, b"\2" * 64]]
    with pytest.raises(SecAggRefused, match="does not verify"):
        fed.clients[1].receive(UnmaskRequest(1, 1, survivors, [], forged))


def test_replayed_messages_from_an_earlier_round_are_refused():
    fed1 = Federation(4, dim=DIM)
    inputs = ring_inputs(fed1)
    fed1.run(inputs)
    old_start = fed1.server.start()[0].msg
    # A round-1 roster the coordinator kept (genuine round-1 signatures).
    earlier = Federation(4, dim=DIM, identities=fed1.identities)
    old_roster = to_site(earlier.advance(inputs, ServerStage.SHARE), 2, KeyRoster)
    # Round 2 with the same sites, whose machines remember round 1; they have advertised new keys.
    fed2 = Federation(4, dim=DIM, identities=fed1.identities, rnd=2)
    fed2.clients = fed1.clients
    fed2.advance(inputs, ServerStage.SHARE)
    assert isinstance(old_start, SecAggStart) and old_start.round == 1
    with pytest.raises(SecAggRefused, match="not newer"):
        fed2.clients[1].receive(old_start)
    with pytest.raises(SecAggRefused, match="for round 1.1, this site is in 2.1"):
        fed2.clients[3].receive(old_roster)
    # Relabelled as round 2, the old keys' signatures (over round 1) no longer verify.
    with pytest.raises(SecAggRefused, match="does not verify"):
        fed2.clients[2].receive(dataclasses.replace(old_roster, round=2))
    # None of the three sent a share in round 2.
    assert all(fed2.clients[i].stage is ClientStage.ABORTED for i in (1, 2, 3))


def test_an_unknown_mask_prg_is_refused_before_any_key_is_made():
    fed = Federation(3, dim=DIM)
    start = next(o.msg for o in fed.server.start() if o.site == 1)
    with pytest.raises(SecAggRefused, match="unknown mask PRG 'rc4'"):
        fed.clients[1].receive(dataclasses.replace(start, prg="rc4"))
    assert fed.clients[1].stage is ClientStage.ABORTED


def test_a_nan_update_is_refused_and_the_site_leaves_the_round():
    fed = Federation(3, dim=DIM)
    queue = fed.advance({}, ServerStage.MASKED_INPUT)
    assert fed.clients[1].receive(to_site(queue, 1, ShareDelivery)) == []
    bad = np.zeros(DIM, dtype=np.float32)
    bad[5] = np.nan
    with pytest.raises(SecAggRefused, match="NaN"):
        fed.clients[1].set_input(bad, 10)
    assert fed.clients[1].stage is ClientStage.ABORTED
