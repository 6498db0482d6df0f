"""The site's round machine on its own: events in, actions out, no sockets, no threads, no torch.

Secure rounds end to end run through the same machine in ``tests/test_local.py`` and the e2e
tests; these pin the decisions the machine makes by itself (what it declines, when it answers
nothing more, what it trains on, and when a finished training is dropped or held)."""

from __future__ import annotations

import numpy as np
import pytest

from asagiri.causes import AbortCause, Rule
from asagiri.client.machine import End, Evaluate, Send, SetUp, SiteMachine, Train, Unreleased
from asagiri.config import FederationConfig, PolicyConfig, RunSpec
from asagiri.policy import SitePolicy
from asagiri.secagg.replay import ReplayGuard
from asagiri.signedlog import RECEIPT_DOMAIN, SignedLog
from asagiri.site.receipts import RoundWitness
from asagiri.wire.crypto import Identity
from asagiri.wire.errors import RemoteProtocolError
from asagiri.wire.messages import (
    Decline,
    EvaluateIns,
    FitIns,
    FitRes,
    RoundAborted,
    RoundRecord,
    SecAggStart,
    Shutdown,
    Welcome,
)

SITE = 2
COORDINATOR = Identity.generate()
PARAMS = {"w": np.zeros(3, np.float32)}


def welcome(*, secagg: bool) -> Welcome:
    fed = FederationConfig.model_validate({"secagg": {"enabled": secagg, "batches": [[1, 2, 3]]}})
    return Welcome("run-1", 1, 3, RunSpec.of(fed).wire())


def machine(tmp_path, **policy) -> SiteMachine:
    me = Identity.generate()
    peers = {i: Identity.generate().public for i in (1, 3)} | {SITE: me.public}
    site_policy = SitePolicy(PolicyConfig(**policy), peers)
    witness = RoundWitness(SignedLog(tmp_path / "receipts.jsonl", me, domain=RECEIPT_DOMAIN), COORDINATOR.public,
                           SITE, site_policy)
    return SiteMachine(site_id=SITE, identity=me, policy=site_policy, replay=ReplayGuard(), witness=witness)


def joined(tmp_path, *, secagg: bool, **policy) -> SiteMachine:
    m = machine(tmp_path, **policy)
    w = welcome(secagg=secagg)
    [setup] = m.welcome(w)
    assert isinstance(setup, SetUp) and setup.welcome is w
    assert m.set_up(w, None, examples=100) == [] and m.ready
    return m


def sent(actions) -> list:
    return [a.msg for a in actions if isinstance(a, Send)]


def test_a_refused_run_declines_every_round_for_good_and_says_nothing_else(tmp_path):
    m = machine(tmp_path)  # requires secure aggregation
    assert m.welcome(welcome(secagg=False)) == [] and not m.ready
    assert sent(m.receive(FitIns(1, 1, PARAMS, {}))) == [Decline(1, 1, Rule.REQUIRE_SECAGG, True)]
    assert m.receive(FitIns(1, 1, PARAMS, {})) == []  # one Decline per round attempt
    assert m.receive(RoundAborted(1, 1, AbortCause.TOO_FEW_SITES, "")) == []
    with pytest.raises(RemoteProtocolError):
        m.receive(EvaluateIns(1, PARAMS, "val"))
    assert m.receive(Shutdown("bye", True)) == [End(True)]


def test_a_run_the_site_cannot_set_up_is_declined_as_setup(tmp_path):
    m = machine(tmp_path, require_secagg=False)
    w = welcome(secagg=False)
    assert isinstance(m.welcome(w)[0], SetUp)
    assert m.ready  # the protocol goes on while the site sets up; a training waits for it
    ins = FitIns(1, 1, PARAMS, {})
    assert m.receive(ins) == [Train(ins, secure=False)]
    # the set-up fails: the round it agreed to train is declined, and so is every later one
    assert sent(m.set_up(w, "FileNotFoundError: /data/x.npz")) == [Decline(1, 1, Rule.SETUP, True)]
    assert not m.ready and m.refusal is not None and m.refusal.rule is Rule.SETUP
    assert sent(m.receive(FitIns(2, 1, PARAMS, {}))) == [Decline(2, 1, Rule.SETUP, True)]


def test_a_plain_round_trains_sends_and_evaluates(tmp_path):
    m = joined(tmp_path, secagg=False, require_secagg=False)
    ins = FitIns(1, 1, PARAMS, {})
    [train] = m.receive(ins)
    assert train == Train(ins, secure=False) and m.wants(ins)
    res = FitRes(1, 1, {"w": np.ones(3, np.float32)}, 5, {})
    assert sent(m.trained(ins, res)) == [res]
    ev = EvaluateIns(1, PARAMS, "val")
    assert m.receive(ev) == [Evaluate(ev)]


def test_in_the_clear_too_only_the_newest_fitins_is_wanted(tmp_path):
    """A red-team finding: in the clear every FitIns was wanted, so FitIns sent while the site set
    up each held a model until set-up ended.  The newest supersedes the others (the session then
    gives their tensors back), and an older one arriving late does not displace it."""
    m = joined(tmp_path, secagg=False, require_secagg=False)
    first, second, late = FitIns(1, 1, PARAMS, {}), FitIns(2, 1, PARAMS, {}), FitIns(1, 2, PARAMS, {})
    for ins in (first, second, late):
        m.receive(ins)
    assert [m.wants(i) for i in (first, second, late)] == [False, True, False]


def test_a_spent_budget_declines_once_and_for_good(tmp_path):
    m = joined(tmp_path, secagg=False, require_secagg=False)
    ins = FitIns(1, 1, PARAMS, {})
    m.receive(ins)
    assert sent(m.budget_spent(ins)) == [Decline(1, 1, Rule.PRIVACY_BUDGET, True)]
    assert m.budget_spent(ins) == [] and not m.wants(ins)


def test_a_secure_update_that_finishes_first_waits_for_its_round_and_a_superseded_one_is_dropped(tmp_path):
    m = joined(tmp_path, secagg=True)
    first = FitIns(1, 1, PARAMS, {})
    assert m.receive(first) == [Train(first, secure=True)]
    delta = np.ones(3, np.float32)
    # trained before the round's SecAggStart came: nothing leaves the site yet, no clock waits
    assert m.trained(first, (delta, 10)) == []
    assert m._held is not None and m._held.ins is first
    # the attempt is retried: the held update is dropped (it never left: its privacy charge is
    # given back), and only the newest FitIns is trained on
    assert m.receive(RoundAborted(1, 1, AbortCause.TOO_FEW_SITES, "")) == [Unreleased(1)]
    assert m._held is None
    second = FitIns(1, 2, PARAMS, {})
    assert m.receive(second) == [Train(second, secure=True)]
    assert not m.wants(first) and m.wants(second)
    # finished late: discarded, never held or masked, given back
    assert m.trained(first, (delta, 10)) == [Unreleased(1)]
    assert m._held is None
    # held, then superseded by a newer FitIns: given back before the newer one trains
    assert m.trained(second, (delta, 10)) == [] and m._held is not None
    third = FitIns(2, 1, PARAMS, {})
    assert m.receive(third) == [Unreleased(1), Train(third, secure=True)]


def test_after_declining_an_attempt_the_site_answers_nothing_more_in_it(tmp_path):
    m = joined(tmp_path, secagg=True)
    ins = FitIns(1, 1, PARAMS, {})
    m.receive(ins)
    # a SecAggStart whose round parameters the site did not derive: refused, declined by rule
    bad = SecAggStart(1, 1, [1, 2], 4, {}, "x", 0, 1)
    [decline] = sent(m.receive(bad))
    assert isinstance(decline, Decline) and decline.round == 1 and not decline.permanent
    assert m.receive(bad) == [] and not m.wants(ins)
    assert m.trained(ins, (np.ones(3, np.float32), 10)) == [Unreleased(1)]  # never masked: given back


def test_a_record_before_set_up_or_an_unknown_message_is_a_protocol_error(tmp_path):
    m = machine(tmp_path)
    with pytest.raises(RemoteProtocolError):
        m.receive(RoundRecord(1, b"{}"))  # no Welcome handled yet
    m = joined(tmp_path / "b", secagg=False, require_secagg=False)
    with pytest.raises(RemoteProtocolError):
        m.receive(welcome(secagg=False))


def test_a_fedprox_weight_above_the_bound_is_declined(tmp_path):
    """With lr * mu near 1 each step restarts from the global model: the update is close to one
    minibatch's gradient. Each FitIns's mu is held to the site's bounds (issue 26, review)."""
    m = joined(tmp_path, secagg=False, require_secagg=False)
    assert sent(m.receive(FitIns(1, 1, PARAMS, {"mu": 5.0}))) == [Decline(1, 1, Rule.TRAIN_BOUNDS, False)]
    ins = FitIns(1, 2, PARAMS, {"mu": 0.01})
    assert m.receive(ins) == [Train(ins, secure=False)]
