"""The round state machine, driven in-process: no sockets, no clocks."""

from functools import partial

import numpy as np
import pytest

from asagiri.causes import Rule
from asagiri.config import FederationConfig, PolicyConfig, SecAggConfig
from asagiri.coordinator.round import Phase, ProtocolViolation, RoundMachine
from asagiri.policy import SitePolicy
from asagiri.strategy.base import FedAvg
from asagiri.wire.messages import Decline, EvaluateIns, EvaluateRes, FitIns, FitRes, Heartbeat, RoundAborted

PARAMS = {"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}


def machine(selected=(1, 2, 3), k=2, evaluators=None, max_update_norm=None):
    cfg = FederationConfig(min_clients=k)
    return RoundMachine(
        rnd=1, attempt=1, selected=list(selected), evaluators=list(evaluators or selected), min_clients=k,
        global_params=dict(PARAMS), fit_config={}, strategy=FedAvg(cfg, dict(PARAMS)),
        max_update_norm=max_update_norm,
    )


def res(n, value, site_round=1):
    return FitRes(site_round, 1, {"w": np.full(3, n * value, np.float32), "b": np.zeros(1, np.float32)}, n, {})


def finish_eval(m, sites):
    for s in sites:
        m.receive(s, EvaluateRes(1, "val", 10, {"auc": 0.5 + s / 10}))


def test_full_round_weighted_average():
    m = machine()
    out = m.start()
    assert [o.site for o in out] == [1, 2, 3] and all(isinstance(o.msg, FitIns) for o in out)
    m.receive(1, res(10, 1.0))
    m.receive(2, res(30, 2.0))
    out = m.receive(3, res(60, 0.0))
    assert m.phase is Phase.EVALUATE and all(isinstance(o.msg, EvaluateIns) for o in out)
    np.testing.assert_allclose(m.outcome.params["w"], (10 * 1 + 30 * 2) / 100)
    finish_eval(m, [1, 2, 3])
    assert m.phase is Phase.DONE
    assert m.outcome.participants == [1, 2, 3] and m.outcome.dropped == []
    assert m.outcome.evaluation["auc"] == pytest.approx((0.6 + 0.7 + 0.8) / 3)


def test_site_lost_mid_round_completes_with_k_survivors():
    m = machine()
    m.start()
    m.receive(1, res(10, 1.0))
    m.site_lost(3)
    m.receive(2, res(10, 3.0))
    assert m.phase is Phase.EVALUATE
    assert m.outcome.dropped == [3]
    np.testing.assert_allclose(m.outcome.params["w"], 2.0)
    finish_eval(m, [1, 2])
    assert m.phase is Phase.DONE


def test_fewer_than_k_aborts_and_aggregates_nothing():
    m = machine(k=3)
    m.start()
    m.receive(1, res(10, 1.0))
    m.receive(2, res(10, 1.0))
    out = m.site_lost(3)
    assert m.phase is Phase.ABORTED
    assert m.outcome.params is None
    assert {o.site for o in out} == {1, 2} and all(isinstance(o.msg, RoundAborted) for o in out)


def test_timeout_drops_the_silent():
    m = machine()
    m.start()
    m.receive(1, res(10, 1.0))
    m.receive(2, res(10, 1.0))
    m.timed_out()
    assert m.outcome.dropped == [3] and m.phase is Phase.EVALUATE
    # its late answer is ignored, not a violation
    assert m.receive(3, res(10, 1.0)) == []


def test_decline_counts_as_absent():
    m = machine(k=2)
    m.start()
    m.receive(1, Decline(1, 1, Rule.PRIVACY_BUDGET, True))
    m.receive(2, res(10, 1.0))
    m.receive(3, res(10, 1.0))
    assert m.phase is Phase.EVALUATE and m.outcome.withdrawn == [1]


@pytest.mark.parametrize(
    "site, msg, match",
    [
        (4, None, "not selected"),
        (1, Heartbeat(1), "not allowed"),
        (1, FitRes(2, 1, dict(PARAMS), 1, {}), "never asked"),
        (1, FitRes(1, 1, {"w": np.zeros(3, np.float32)}, 1, {}), "exactly the shared"),
        (1, FitRes(1, 1, {"w": np.zeros(4, np.float32), "b": np.zeros(1, np.float32)}, 1, {}), "shape"),
        (1, FitRes(1, 1, {"w": np.full(3, np.nan, np.float32), "b": np.zeros(1, np.float32)}, 1, {}), "finite"),
        (1, EvaluateRes(1, "val", 1, {}), "out of stage"),
    ],
)
def test_violations(site, msg, match):
    m = machine()
    m.start()
    with pytest.raises(ProtocolViolation, match=match):
        m.receive(site, msg if msg is not None else res(1, 1.0))


def test_second_answer_is_a_violation():
    m = machine()
    m.start()
    m.receive(1, res(10, 1.0))
    with pytest.raises(ProtocolViolation, match="second answer"):
        m.receive(1, res(10, 1.0))


# ---- with secure aggregation ---------------------------------------------------------------------

def secure_machine(n=3, k=2):
    from asagiri.secagg.inmemory import LocalRound

    cfg = FederationConfig(min_clients=k)
    local = LocalRound(list(range(1, n + 1)), dim=4, secagg=SecAggConfig(), min_clients=k,
                       policy=partial(SitePolicy, PolicyConfig(min_participants=k, min_group=2)))
    m = RoundMachine(rnd=1, attempt=1, selected=local.ids, evaluators=local.ids, min_clients=k,
                     global_params=dict(PARAMS), fit_config={}, strategy=FedAvg(cfg, dict(PARAMS)),
                     secagg=local.server)
    return m, local.identities


def test_secure_round_refuses_plaintext_updates():
    m, _ = secure_machine()
    out = m.start()
    assert {type(o.msg).__name__ for o in out} == {"FitIns", "SecAggStart"}
    with pytest.raises(ProtocolViolation, match="plaintext update"):
        m.receive(1, res(10, 1.0))


def test_secure_round_turns_bad_secagg_messages_into_violations():
    from asagiri.wire.messages import AdvertiseKeys, MaskedInput

    m, ids = secure_machine()
    m.start()
    with pytest.raises(ProtocolViolation, match="does not verify"):
        m.receive(1, AdvertiseKeys(1, 1, b"\1" * 32, b"\2" * 32, b"\3" * 64))
    with pytest.raises(ProtocolViolation, match="out of stage"):
        m.receive(2, MaskedInput(1, 1, {"y": np.zeros(5, np.uint32)}))


def test_secure_round_aborts_below_k_when_sites_vanish_during_key_setup():
    m, _ = secure_machine(n=3, k=3)
    m.start()
    m.site_lost(1)
    out = m.timed_out()  # the others never advertised either
    assert m.phase is Phase.ABORTED and "fewer than min_clients=3" in m.outcome.abort_reason
    assert m.outcome.params is None
    assert all(isinstance(o.msg, RoundAborted) for o in out)


def test_an_update_longer_than_max_update_norm_is_refused_in_the_clear():
    """Per sample: the update is n * delta, and delta is what an honest site bounded."""
    m = machine(max_update_norm=1.0)
    m.start()
    m.receive(1, res(10, 0.5))  # |delta| = 0.5 * sqrt(3) = 0.87
    with pytest.raises(ProtocolViolation, match="update norm 1.732 per sample exceeds train.max_update_norm=1"):
        m.receive(2, res(10, 1.0))


def test_the_final_test_evaluation_ignores_stragglers_and_refuses_anything_else():
    """A late FitRes or validation result during the test evaluation is ignored (it once raised a
    TypeError: a union type joined to a tuple of message classes)."""
    from asagiri.coordinator.round import TestEvaluation

    m = TestEvaluation(rnd=3, sites=[1, 2], params=dict(PARAMS))
    assert m.receive(1, res(5, 0.1, site_round=3)) == []
    assert m.receive(2, EvaluateRes(3, "val", 10, {"auc": 0.5})) == []
    assert m.receive(2, Decline(3, 1, Rule.STAGE, False)) == []
    with pytest.raises(ProtocolViolation, match="Heartbeat during the final test evaluation"):
        m.receive(1, Heartbeat(1))
    assert not m.finished


def test_the_test_auc_is_pooled_only_where_every_site_shared_its_scores():
    """A site's default policy keeps its per-example scores (their number is its test-set size):
    it sends its own AUC. The coordinator pools scores only when every site sent them, and reports
    the sites' mean AUC either way; a hostile site's AUC of 7 is left out."""
    from asagiri.coordinator.round import TestEvaluation

    scores = {"scores": np.array([[0.9, 0.1], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3]], np.float32),
              "labels": np.array([0, 1, 1, 0], np.int64)}
    shared = TestEvaluation(rnd=3, sites=[1, 2], params=dict(PARAMS))
    shared.receive(1, EvaluateRes(3, "test", 4, {}, dict(scores)))
    shared.receive(2, EvaluateRes(3, "test", 4, {}, dict(scores)))
    assert shared.pooled()["test_auc"] == 1.0 and shared.pooled()["test_examples"] == 8

    mixed = TestEvaluation(rnd=3, sites=[1, 2, 3], params=dict(PARAMS))
    mixed.receive(1, EvaluateRes(3, "test", 4, {}, dict(scores)))
    mixed.receive(2, EvaluateRes(3, "test", 1, {"auc": 0.5, "accuracy": 0.5}))
    mixed.receive(3, EvaluateRes(3, "test", 1, {"auc": 7.0}))
    out = mixed.pooled()
    assert mixed.finished and "test_auc" not in out and "test_examples" not in out
    assert out["test_site_auc"] == {"1": 1.0, "2": 0.5} and out["test_auc_site_mean"] == 0.75


@pytest.mark.parametrize("bad", [
    {"scores": np.array([[np.nan, 1.0]], np.float32), "labels": np.array([0])},
    {"scores": np.array([[0.5, 0.5]], np.float32), "labels": np.array([7])},
    {"scores": np.array([[0.2, 0.3, 0.5]], np.float32), "labels": np.array([1])},  # 3 columns, the others 2
    {"scores": np.array([[2.0, -1.0]], np.float32), "labels": np.array([1])},
    {"scores": np.array([[0.5, 0.5]], np.float64), "labels": np.array([1])},
])
def test_a_hostile_sites_test_predictions_close_its_channel_and_the_pooling_stands(bad):
    """Red-team finding: NaN scores, a label naming no column or scores laid out otherwise once made
    the pooling raise, and the run ended with no summary."""
    from asagiri.coordinator.round import TestEvaluation

    good = {"scores": np.array([[0.9, 0.1], [0.2, 0.8]], np.float32), "labels": np.array([0, 1])}
    m = TestEvaluation(rnd=3, sites=[1, 2], params=dict(PARAMS))
    m.receive(1, EvaluateRes(3, "test", 2, {}, good))
    with pytest.raises(ProtocolViolation, match="test predictions"):
        m.receive(2, EvaluateRes(3, "test", 1, {}, bad))
    m.site_lost(2)
    assert m.pooled()["test_auc"] == 1.0 and m.pooled()["test_sites"] == [1]
