"""Well-typed but wrong messages (hypothesis): every field valid on its own, the message wrong for
the round, at every stage of an honest round.  A site's machine may only refuse (``Refusal``), the
coordinator's only blame the sender (``ProtocolViolation``); nothing else may escape either."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asagiri.policy import Refusal
from asagiri.secagg.server import ProtocolViolation
from asagiri.wire.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySig,
    KeyRoster,
    MaskedInput,
    MessageError,
    SecAggStart,
    ShareDelivery,
    ShareKeys,
    SumAnnounce,
    SumProof,
    SumVouch,
    UnmaskRequest,
    UnmaskResponse,
)

from .targets import _fresh_client, _fresh_server, _inputs, _round, honest_round

ids = st.lists(st.integers(0, 5), max_size=5, unique=True).map(sorted)
rounds = st.integers(1, 3)
attempts = st.integers(1, 2)
key = st.binary(min_size=32, max_size=32)
sig = st.binary(min_size=64, max_size=64)
scalars = st.sampled_from([24, 48]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
share = st.binary(min_size=68, max_size=68)
site = st.integers(0, 5)


def _entries(draw_site=site):
    return st.lists(st.tuples(draw_site, key, key, sig).map(list), max_size=4, unique_by=lambda e: e[0])


TO_SITE = st.one_of(
    st.builds(SecAggStart, rounds, attempts, ids, st.integers(1, 20),
              st.fixed_dictionaries({"bits": st.sampled_from([32, 64]), "clip": st.floats(0.1, 2.0),
                                     "scale": st.floats(1.0, 1e6), "max_samples": st.integers(1, 10**6),
                                     "max_sites": st.integers(1, 10)}),
              st.sampled_from(["aes128-ctr", "chacha20", "other"]), st.integers(0, 4), st.integers(1, 4)),
    st.builds(KeyRoster, rounds, attempts, ids, _entries()),
    st.builds(ShareDelivery, rounds, attempts,
              st.lists(st.tuples(site, st.binary(max_size=300)).map(list), max_size=4, unique_by=lambda e: e[0])),
    st.builds(ConsistencyCheck, rounds, attempts, ids),
    st.builds(UnmaskRequest, rounds, attempts, ids, ids,
              st.lists(st.tuples(site, ids, sig).map(list), max_size=4, unique_by=lambda e: e[0])),
    st.builds(SumAnnounce, rounds, attempts,
              st.tuples(st.integers(0, 12), st.sampled_from(["<u4", "<u8"])).map(
                  lambda t: {"s": np.arange(t[0], dtype=t[1])})),
    st.builds(SumProof, rounds, attempts,
              st.lists(st.tuples(site, scalars, sig).map(list), max_size=4, unique_by=lambda e: e[0])),
)

TO_COORDINATOR = st.one_of(
    st.builds(AdvertiseKeys, rounds, attempts, key, key, sig),
    st.builds(ShareKeys, rounds, attempts,
              st.lists(st.tuples(site, st.binary(max_size=300)).map(list), max_size=4, unique_by=lambda e: e[0])),
    st.builds(MaskedInput, rounds, attempts,
              st.integers(0, 12).map(lambda n: {"y": np.arange(n, dtype="<u4")})),
    st.builds(ConsistencySig, rounds, attempts, ids, sig),
    st.builds(UnmaskResponse, rounds, attempts,
              st.lists(st.tuples(site, share).map(list), max_size=3, unique_by=lambda e: e[0]),
              st.lists(st.tuples(site.map(lambda s: s + 10), share).map(list), max_size=3, unique_by=lambda e: e[0])),
    st.builds(SumVouch, rounds, attempts, scalars, sig),
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(stage=st.integers(0, 7), wrong=st.data())
def test_a_site_only_refuses_a_wrong_message_at_any_stage(stage, wrong):
    to_site, _ = honest_round()
    client = _fresh_client()
    delta, n = _inputs()[1]
    for _, msg in to_site[:stage]:
        client.receive(msg)
        if client.stage.value == "ready":
            client.set_input(delta, n, trained_on=(_round().params.params_digest, {}))
    try:
        msg = wrong.draw(TO_SITE)
    except MessageError:
        return
    try:
        client.receive(msg)
    except Refusal:
        pass


@FAST
@given(upto=st.integers(0, 20), sender=st.integers(0, 6), wrong=st.data())
def test_the_coordinator_only_blames_the_sender_of_a_wrong_message(upto, sender, wrong):
    _, from_sites = honest_round()
    server = _fresh_server()
    for who, msg in from_sites[:upto]:
        server.receive(who, msg)
    if server.finished:
        return
    try:
        msg = wrong.draw(TO_COORDINATOR)
    except MessageError:
        return
    try:
        server.receive(sender, msg)
    except ProtocolViolation as exc:
        assert exc.site == sender
