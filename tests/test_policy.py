"""The site's policy on a run's spec, its config, its replay guard, and the round digest it signs."""

import dataclasses
import json
from functools import partial

import numpy as np
import pytest

from asagiri.client.state import PersistentReplayGuard, StateError
from asagiri.config import FederationConfig, PolicyConfig, RunSpec, SecAggConfig, SiteConfig
from asagiri.policy import Refusal, SitePolicy
from asagiri.secagg.binding import RoundParams, canonical, params_digest, spec_digest
from asagiri.secagg.inmemory import LocalRound
from asagiri.secagg.quantize import QuantPlan
from asagiri.wire.crypto import Identity
from asagiri.wire.messages import FitIns

KEY = Identity.generate().public


def spec(**sections):
    base = RunSpec.of(FederationConfig())
    return base.model_copy(update={k: getattr(base, k).model_copy(update=v) for k, v in sections.items()}).wire()


def check(policy_cfg=None, run_id="r", peers=True, **sections):
    policy = SitePolicy(policy_cfg or PolicyConfig(), {1: KEY} if peers else {})
    return policy.check_run(run_id, spec(**sections))


def test_the_default_policy_accepts_the_default_run():
    assert check().secagg.enabled


@pytest.mark.parametrize("policy_cfg, run_id, peers, sections, rule", [
    (None, "r", True, {"secagg": {"enabled": False}}, "require_secagg"),
    (None, "r", False, {}, "pinned_peers"),
    (PolicyConfig(require_dp=True), "r", True, {}, "require_dp"),
    (None, "r", True, {"dp": {"enabled": True, "target_epsilon": 8.5}}, "max_epsilon"),
    (None, "r", True, {"dp": {"enabled": True, "target_delta": 1e-3}}, "max_delta"),
    (PolicyConfig(run_id="cxr-2026"), "other", True, {}, "run_id"),
])
def test_a_run_that_asks_for_less_is_refused_with_the_rule_named(policy_cfg, run_id, peers, sections, rule):
    with pytest.raises(Refusal) as info:
        check(policy_cfg, run_id, peers, **sections)
    assert info.value.rule == rule


def test_a_policy_that_allows_it_takes_part():
    relaxed = PolicyConfig(require_secagg=False, max_epsilon=50)
    assert not check(relaxed, secagg={"enabled": False}).secagg.enabled
    assert check(relaxed, dp={"enabled": True, "target_epsilon": 50.0}).dp.target_epsilon == 50


@pytest.mark.parametrize("bad", [
    {"secagg": {"clip": "lots"}}, {"model": {"name": "gpt"}}, {"rounds": -1}, {"extra": 1}, {"dp": None},
])
def test_a_malformed_spec_is_a_refusal_not_an_exception(bad):
    body = spec()
    for k, v in bad.items():
        body[k] = {**body[k], **v} if isinstance(body.get(k), dict) and isinstance(v, dict) else v
    with pytest.raises(Refusal) as info:
        SitePolicy(PolicyConfig(), {1: KEY}).check_run("r", body)
    assert info.value.rule == "spec"


def test_refusals_are_counted_by_rule():
    policy = SitePolicy(PolicyConfig(), {1: KEY})
    for _ in range(2):
        with pytest.raises(Refusal):
            policy.check_run("r", spec(secagg={"enabled": False}))
    assert policy.refusals == {"require_secagg": 2}


def test_secure_aggregation_needs_pinned_peers_in_the_site_config(tmp_path):
    base = {"site_id": 1, "identity_key": tmp_path / "k", "coordinator": {"public_key": KEY.hex()}}
    with pytest.raises(ValueError, match="peers: required"):
        SiteConfig.model_validate(base)
    assert SiteConfig.model_validate({**base, "peers": {1: KEY.hex()}}).policy.require_secagg
    assert SiteConfig.model_validate({**base, "policy": {"require_secagg": False}}).peers is None
    with pytest.raises(ValueError, match="min_participants"):
        SiteConfig.model_validate({**base, "peers": {1: KEY.hex()}, "policy": {"min_participants": 1}})


def test_the_replay_guard_survives_a_restart_and_refuses_a_damaged_file(tmp_path):
    path = tmp_path / "state" / "secagg_rounds.json"
    guard = PersistentReplayGuard(path)
    assert guard.advance("run", 3, 1) and guard.advance("run", 3, 2) and guard.advance("other", 1, 1)
    again = PersistentReplayGuard(path)  # what a restarted site loads
    assert not again.advance("run", 3, 2) and not again.advance("run", 1, 5)
    assert again.advance("run", 4, 1) and again.last("other") == (1, 1)
    path.write_text("{not json")
    with pytest.raises(StateError, match="unreadable replay guard"):
        PersistentReplayGuard(path)
    path.write_text(json.dumps({"run": ["3", 1]}))
    with pytest.raises(StateError):
        PersistentReplayGuard(path)


def test_a_restarted_site_machine_refuses_a_round_it_entered(tmp_path):
    guard_path = tmp_path / "rounds.json"
    first = LocalRound([1, 2, 3], dim=4, secagg=SecAggConfig(), policy=partial(SitePolicy, PolicyConfig(min_group=2)))
    c1 = first.clients[1]
    c1.replay = PersistentReplayGuard(guard_path)
    c1.receive(first.server.start()[0].msg)
    again = LocalRound([1, 2, 3], dim=4, secagg=SecAggConfig(), identities=first.identities,
                       policy=partial(SitePolicy, PolicyConfig(min_group=2)))
    again.clients[1].replay = PersistentReplayGuard(guard_path)
    with pytest.raises(Refusal, match="^replay: "):
        again.clients[1].receive(again.server.start()[0].msg)


# ---- the round digest --------------------------------------------------------------------------------


def round_params(**change):
    fit = FitIns(1, 1, {"w": np.zeros(3, np.float32)}, {"mu": 0.0, "seed": 1})
    base = dict(run_id="r", round=1, attempt=1, participants=(1, 2, 3), vector_len=4,
                plan=QuantPlan.plan(bits=32, clip=1.0, max_samples=10, max_sites=3), prg="aes128-ctr", degree=0,
                threshold=2, params_digest=params_digest(fit.params), fit_config=fit.config,
                spec_digest=spec_digest(spec()))
    return RoundParams(**{**base, **change})


@pytest.mark.parametrize("change", [
    {"run_id": "s"}, {"round": 2}, {"attempt": 2}, {"participants": (1, 2, 4)}, {"vector_len": 5},
    {"plan": QuantPlan(bits=32, clip=1.0, scale=2.0, max_samples=10, max_sites=3)}, {"prg": "chacha20"},
    {"degree": 2}, {"threshold": 3}, {"params_digest": params_digest({"w": np.ones(3, np.float32)})},
    {"fit_config": {"mu": 0.01, "seed": 1}}, {"spec_digest": spec_digest(spec(train={"lr": 0.5}))},
])
def test_every_round_parameter_changes_the_digest(change):
    assert round_params(**change).digest != round_params().digest
    assert round_params(**change).context != round_params().context


def test_the_digest_does_not_depend_on_order_or_ids_listing():
    assert round_params(participants=(3, 1, 2)).digest == round_params().digest
    assert canonical({"b": 1, "a": [1.5, {"y": None, "x": b"\0"}]}) == canonical({"a": [1.5, {"x": b"\0", "y": None}],
                                                                                  "b": 1})
    assert params_digest({"a": np.zeros(2, np.float32), "b": np.ones(1, np.float32)}) == \
        params_digest({"b": np.ones(1, np.float32), "a": np.zeros(2, np.float32)})
    # Same bytes, other dtype or shape: another digest.
    assert params_digest({"a": np.zeros(2, np.float32)}) != params_digest({"a": np.zeros((1, 2), np.float32)})
    assert params_digest({"a": np.zeros(2, np.float32)}) != params_digest({"a": np.zeros(2, np.int32)})
    assert spec_digest({"x": 1}) != spec_digest({"x": 1.0})


def test_the_quorum_counts_one_colluding_signer_even_when_the_policy_assumes_none():
    """More than half of the participants with one of them counted as signing both lists: two
    certified lists always share an honest signer (issue 26, attack 4)."""
    assert [dataclasses.replace(round_params(), participants=tuple(range(1, n + 1))).quorum for n in (2, 3, 4, 5, 10)] \
        == [2, 3, 3, 4, 6]
    for n in range(2, 40):
        q = dataclasses.replace(round_params(), participants=tuple(range(1, n + 1))).quorum
        assert 2 * q - n >= 2 and q <= n  # the overlap of two quorums holds the colluder and an honest site


def test_evaluation_results_carry_epsilon_and_sigma_only_if_the_policy_says_so(tmp_path):
    """Under noise_multiplier auto, sigma and epsilon are functions of the site's sample rate: sent
    together they give away how many records it trains on (found in review)."""
    from asagiri.site import SiteWorker
    from asagiri.wire.messages import EvaluateIns, Welcome

    key = Identity.generate()
    key.save(tmp_path / "k.key")
    cfg = SiteConfig(site_id=1, identity_key=tmp_path / "k.key", state_dir=tmp_path / "state",
                     coordinator={"public_key": key.public.hex()}, peers={1: key.public.hex()})
    fed = FederationConfig.model_validate({
        "model": {"width": 8, "norm": "group"}, "train": {"augment": False},
        "data": {"dataset": "synthetic", "synthetic_samples": 64, "partition": {"scheme": "iid"}},
        "dp": {"enabled": True},
    })
    spec = RunSpec.of(fed)
    worker = SiteWorker(cfg, Welcome("r", 0, 1, spec.wire()), spec)
    params = {k: v.detach().numpy().copy() for k, v in worker.model.state_dict().items() if k in worker.shared}
    quiet = worker.evaluate(EvaluateIns(1, params, "val"))
    told = worker.evaluate(EvaluateIns(1, params, "val"), report_privacy=True)
    assert "noise_multiplier" not in quiet.metrics and "epsilon" not in quiet.metrics
    assert told.metrics["noise_multiplier"] > 0 and "epsilon" in told.metrics
