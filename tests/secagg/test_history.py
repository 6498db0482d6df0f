"""A verified round's sum, checked by a site that was not among its survivors (SPEC §6.9,
``secagg/history.py``): the honest record passes; any change to what it proves, or a record of a
round on another model, is refused."""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest

from asagiri.config import PolicyConfig, SecAggConfig
from asagiri.policy import SitePolicy
from asagiri.secagg.binding import params_digest
from asagiri.secagg.history import RecordRefused, check_record
from asagiri.secagg.inmemory import LocalRound
from asagiri.wire.codec import decode, encode
from asagiri.wire.crypto import Identity
from asagiri.wire.errors import RemoteProtocolError
from asagiri.wire.messages import SumRecord

DIM = 300


@pytest.fixture(scope="module")
def verified_round():
    """Four sites sum in a complete 2-of-4 round; site 5 (pinned, not a participant) checks the record."""
    ids = [1, 2, 3, 4]
    keys = {i: Identity.generate() for i in [*ids, 5]}
    sa = SecAggConfig(mode="complete", threshold=2)
    fed = LocalRound(ids=ids, dim=DIM, secagg=sa, identities={i: keys[i] for i in ids}, min_clients=3,
                     policy=partial(SitePolicy, PolicyConfig(require_batches=False)))
    rng = np.random.default_rng(7)
    server = fed.deliver({i: (rng.normal(0, 0.05, DIM).astype(np.float32), 10 + i) for i in ids})
    assert server.result is not None, server.abort_reason
    r = server.result
    record = SumRecord(1, 1, list(fed.params.participants), {}, list(r.survivors), {"s": r.total}, r.vouches)
    peers = {i: k.public for i, k in keys.items()}
    check = partial(check_record, run_id=fed.run_id, secagg=sa, spec_digest=fed.spec_digest,
                    vector_len=DIM + 1, peers=peers)
    return fed, server, record, check


def test_an_honest_record_proves_its_sum_to_a_site_that_was_not_in_the_round(verified_round):
    fed, server, record, check = verified_round
    proven = check(record, trained_on=params_digest(fed.fit.params))
    assert proven.digest == server.result.sum_digest
    assert np.array_equal(proven.total, server.result.total)
    assert proven.survivors == (1, 2, 3, 4) and proven.plan == fed.plan


def _changed(record: SumRecord, **fields) -> SumRecord:
    return dataclasses.replace(record, **fields)


def test_a_record_that_was_changed_in_any_part_is_refused(verified_round):
    fed, server, record, check = verified_round
    own = params_digest(fed.fit.params)
    total = server.result.total
    nudged = total.copy()
    nudged[17] += 1  # one quantum in one coordinate
    vouches = [list(v) for v in record.vouches]
    lying = [list(v) for v in vouches]
    lying[0][1] = bytes(len(lying[0][1]))  # a vouch's scalars, re-typed: its signature no longer verifies
    changes = {
        "a sum off by one quantum": _changed(record, total={"s": nudged}),
        "a vouch missing": _changed(record, vouches=vouches[1:]),
        "a vouch changed": _changed(record, vouches=lying),
        "a survivor dropped from the list": _changed(record, survivors=[1, 2, 3], vouches=vouches[:3]),
        "another fit config": _changed(record, config={"mu": 0.1}),
        "another attempt": _changed(record, attempt=2),
        "another round": _changed(record, round=2),
        "more participants": _changed(record, participants=[1, 2, 3, 4, 5]),
        "survivors outside the participants": _changed(record, participants=[1, 2, 3]),
        "a sum of another length": _changed(record, total={"s": total[:-1]}),
    }
    for what, bad in changes.items():
        try:
            check(bad, trained_on=own)
        except RecordRefused:
            continue
        pytest.fail(f"{what}: the record was accepted")
    # the same honest record, checked by a site that holds another model: the round was not on it
    with pytest.raises(RecordRefused, match="does not verify"):
        check(record, trained_on=bytes(32))
    # a survivor without a pinned key
    with pytest.raises(RecordRefused, match="pinned"):
        check_record(record, run_id=fed.run_id, secagg=fed.secagg, spec_digest=fed.spec_digest, vector_len=DIM + 1,
                     peers={}, trained_on=own)


def test_a_mangled_record_is_refused_or_does_not_decode_and_never_breaks_the_check(verified_round):
    """Byte flips anywhere in the encoded record: the decoder or the check says no, nothing else."""
    fed, _, record, check = verified_round
    own = params_digest(fed.fit.params)
    encoded = bytearray(encode(record))
    rng = np.random.default_rng(3)
    outcomes = {"undecodable": 0, "refused": 0}
    for _ in range(300):
        mangled = bytearray(encoded)
        for i in rng.integers(0, len(mangled), size=int(rng.integers(1, 4))):
            mangled[i] ^= int(rng.integers(1, 256))
        try:
            msg = decode(bytes(mangled), max_payload_bytes=1 << 20)
        except RemoteProtocolError:
            outcomes["undecodable"] += 1
            continue
        try:
            check(msg, trained_on=own)
        except RecordRefused:
            outcomes["refused"] += 1
            continue
        # a flip that left the record meaning the same (a tensor's name, say, is not checked)
        assert np.array_equal(msg.total["s"], record.total["s"]) and msg.vouches == record.vouches
    assert outcomes["refused"] > 50 and outcomes["undecodable"] > 10, outcomes


def test_a_record_is_held_to_the_checking_sites_survivor_rules(verified_round):
    """A red-team finding: with only the signatures checked, one enrolled site working with the
    coordinator could vouch alone for any sum, and a non-survivor adopted it.  A record's
    survivors must meet the checking site's own rules: at least min_participants plus colluders,
    whole batches, every participant pinned."""
    fed, _, record, check = verified_round
    own = params_digest(fed.fit.params)
    peers = check.keywords["peers"]
    assert check(record, trained_on=own, policy=SitePolicy(PolicyConfig(require_batches=False), peers)).survivors
    for limits, why in (({"min_participants": 5}, "min_participants"), ({"colluders": 2}, "min_participants")):
        with pytest.raises(RecordRefused, match=why):
            check(record, trained_on=own, policy=SitePolicy(PolicyConfig(require_batches=False, **limits), peers))
    alone = dataclasses.replace(record, survivors=[1], vouches=[list(record.vouches[0])])
    with pytest.raises(RecordRefused, match="min_participants"):
        check(alone, trained_on=own, policy=SitePolicy(PolicyConfig(require_batches=False), peers))
    # a run with participation batches: a record whose survivors split a batch is refused
    batched = fed.secagg.model_copy(update={"batches": [[1, 2], [3, 4, 5]]})
    with pytest.raises(RecordRefused, match="batch"):
        check_record(record, run_id=fed.run_id, secagg=batched, spec_digest=fed.spec_digest, vector_len=DIM + 1,
                     peers=peers, trained_on=own, policy=SitePolicy(PolicyConfig(min_participants=2), peers))


def test_a_round_past_what_the_context_can_name_is_refused_before_it_is_sent():
    """Another red-team finding: a round of 2^32 or more crashed the site (the round context
    packs rounds as u32).  The wire refuses such a message before anything reads it."""
    from asagiri.wire.messages import MessageError

    with pytest.raises(MessageError, match="round"):
        SumRecord(1 << 32, 1, [1, 2, 3], {}, [1, 2, 3], {"s": np.zeros(3, "<u4")}, [])
