"""The site's policy on a run's spec, its config, its replay guard, and the round digest it signs."""

import dataclasses
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from asagiri.client.state import PersistentJoinedRuns, PersistentReplayGuard, StateError
from asagiri.config import FederationConfig, PolicyConfig, RunSpec, SecAggConfig, SiteConfig
from asagiri.policy import Refusal, SitePolicy, coarse
from asagiri.recipes import load_recipe
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
    quiet = worker.evaluate(EvaluateIns(1, params, "val"), SitePolicy(PolicyConfig()))
    told = worker.evaluate(EvaluateIns(1, params, "val"), SitePolicy(PolicyConfig(report_privacy=True)))
    assert "noise_multiplier" not in quiet.metrics and "epsilon" not in quiet.metrics
    assert told.metrics["noise_multiplier"] > 0 and "epsilon" in told.metrics
    # and the count and the metrics, as the policy shows them (a red-team finding: an exact
    # accuracy k/n over a few rounds gives the validation split's size n away)
    exact = worker.evaluate(EvaluateIns(1, params, "val"), SitePolicy(PolicyConfig(count="exact")))
    assert exact.num_examples == len(worker.data.val) > 1 and quiet.num_examples == 1
    assert quiet.metrics == {k: coarse(v, 2) for k, v in exact.metrics.items()}
    assert any(round(v, 2) != v for v in exact.metrics.values())  # the rounding did something
    # a crafted head (bias 2^40 on class 0) makes the loss 2^40 * k/n: to two decimals that was the
    # size exactly (red-team finding); two significant digits leave many sizes that fit
    crafted = {k: v.copy() for k, v in params.items()}
    crafted["head.weight"][:] = 0.0
    crafted["head.bias"][:] = [2.0**40, 0.0]
    sent = worker.evaluate(EvaluateIns(1, crafted, "val"), SitePolicy(PolicyConfig())).metrics["loss"]
    n = len(worker.data.val)
    fits = {m for m in range(max(2, n // 2), 2 * n) if any(coarse(2.0**40 * k / m, 2) == sent for k in range(m + 1))}
    assert n in fits and len(fits) > 3, (sent, fits)
    # a test result keeps its per-example scores unless the policy shares them (their number is the
    # size of the site's test set): the site's own AUC and accuracy instead, as rounded and counted
    kept = worker.evaluate(EvaluateIns(1, params, "test"), SitePolicy(PolicyConfig()))
    shared = worker.evaluate(EvaluateIns(1, params, "test"), SitePolicy(PolicyConfig(share_predictions=True)))
    assert kept.predictions == {} and kept.num_examples == 1 and {"auc", "accuracy"} <= set(kept.metrics)
    assert len(shared.predictions["scores"]) == shared.num_examples == len(worker.data.test) > 1


# ---- the site's bounds on training (policy.bounds) ---------------------------------------------


RECIPES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_the_default_bounds_accept_the_default_run_and_every_shipped_recipe():
    assert RECIPES
    runs = {"defaults": FederationConfig()}
    for path in RECIPES:
        recipe = load_recipe(path)
        runs[path.name] = FederationConfig.model_validate({**recipe.settings, "rounds": recipe.rounds})
    for name, fed in runs.items():
        policy = SitePolicy(PolicyConfig(), {1: KEY})
        assert policy.check_run("r", RunSpec.of(fed).wire()) == RunSpec.of(fed), name
        assert not policy.refusals, name


@pytest.mark.parametrize("bounds, sections, rule", [
    ({"models": ["small_cnn"]}, {"model": {"name": "resnet18"}}, "model"),
    ({"norms": ["group"]}, {}, "model"),
    ({}, {"model": {"width": 256}}, "model"),
    ({"min_width": 16}, {"model": {"width": 8}}, "model"),
    ({}, {"train": {"lr": 50.0}}, "train_bounds"),
    ({}, {"train": {"lr": 1e-7}}, "train_bounds"),
    ({}, {"train": {"local_steps": 5000}}, "train_bounds"),
    ({}, {"train": {"local_steps": 1}}, "train_bounds"),  # one minibatch's gradient
    # epochs: the step count would follow the data size
    ({}, {"train": {"local_epochs": 1, "local_steps": None}}, "train_bounds"),
    ({"allow_epochs": True}, {"train": {"local_epochs": 20, "local_steps": None}}, "train_bounds"),
    ({}, {"train": {"batch_size": 1}}, "train_bounds"),
    ({}, {"train": {"batch_size": 100_000}}, "train_bounds"),  # full batch: deterministic training
    ({"optimizers": ["sgd"]}, {}, "train_bounds"),
    ({}, {"train": {"optimizer": "sgd", "momentum": 0.99}}, "train_bounds"),
    ({}, {"train": {"weight_decay": 1.0}}, "train_bounds"),
    ({}, {"train": {"augment": False}}, "train_bounds"),
    ({"require_augment": "always"}, {"train": {"augment": False}, "dp": {"enabled": True}}, "train_bounds"),
    ({"secagg_bits": [32]}, {"secagg": {"bits": 64}}, "secagg_bounds"),
    ({}, {"secagg": {"clip": 0.01}}, "secagg_bounds"),
    ({}, {"secagg": {"max_samples_per_site": 1}}, "secagg_bounds"),
    ({}, {"dp": {"enabled": True, "max_grad_norm": 100.0}}, "dp_bounds"),
    ({}, {"dp": {"enabled": True, "max_grad_norm": 1e-4}}, "dp_bounds"),
    ({}, {"dp": {"enabled": True, "noise_multiplier": 0.1}}, "dp_bounds"),
    # the server step each site derives: an adaptive one moves every weight by about server_lr
    ({}, {"strategy": {"name": "fedadam", "server_lr": 0.5}}, "train_bounds"),
    ({}, {"strategy": {"name": "fedavgm", "server_lr": 3.0, "server_momentum": 0.9}}, "train_bounds"),
])
def test_a_training_setting_outside_the_bounds_is_refused_with_its_rule(bounds, sections, rule):
    policy = SitePolicy(PolicyConfig(bounds=bounds), {1: KEY})
    with pytest.raises(Refusal) as info:
        policy.check_run("r", spec(**sections))
    assert info.value.rule == rule and policy.refusals == {rule: 1}
    assert not policy.joined.runs  # a refused run is not recorded as joined


@pytest.mark.parametrize("sections", [
    {"train": {"augment": False}, "dp": {"enabled": True}},  # DP-SGD randomises training itself
    {"train": {"optimizer": "adam", "momentum": 0.99}},  # Adam takes no momentum
    {"secagg": {"enabled": False, "bits": 64, "clip": 0.01}},  # no ring, nothing to bound
    {"dp": {"enabled": True, "noise_multiplier": 0.8, "max_grad_norm": 0.1}},
    {"train": {"lr": 1.0, "local_steps": 500, "batch_size": 16, "weight_decay": 0.01}},  # the edges are inside
    {"strategy": {"name": "fedyogi", "server_lr": 0.1}},
])
def test_settings_within_the_bounds_are_accepted(sections):
    check(PolicyConfig(require_secagg=False), **sections)


def test_epochs_are_accepted_only_where_the_site_allows_them():
    check(PolicyConfig(require_secagg=False, bounds={"allow_epochs": True}),
          train={"local_epochs": 5, "local_steps": None})


def test_bounds_whose_range_is_empty_are_a_config_error():
    with pytest.raises(ValueError, match="min_lr"):
        PolicyConfig(bounds={"min_lr": 0.5, "max_lr": 0.1})
    with pytest.raises(ValueError):
        PolicyConfig(bounds={"models": []})


# ---- a run's spec is fixed for its run_id -------------------------------------------------------


def test_a_changed_spec_under_the_same_run_id_is_refused_also_after_a_restart(tmp_path):
    path = tmp_path / "state" / "run_specs.json"
    policy = SitePolicy(PolicyConfig(), {1: KEY}, PersistentJoinedRuns(path))
    policy.check_run("r", spec(), num_sites=4, site_index=1)
    policy.check_run("r", spec(), num_sites=4, site_index=1)  # a reconnect: the same Welcome again
    policy.check_run("other", spec(train={"lr": 0.01}))  # another run may have another spec
    with pytest.raises(Refusal, match="^spec_changed: "):
        policy.check_run("r", spec(train={"lr": 0.01}), num_sites=4, site_index=1)
    restarted = SitePolicy(PolicyConfig(), {1: KEY}, PersistentJoinedRuns(path))  # what a restarted site loads
    restarted.check_run("r", spec(), num_sites=4, site_index=1)
    for changed, layout in [(spec(train={"lr": 0.01}), {}), (spec(), {"num_sites": 3, "site_index": 1}),
                            (spec(), {"num_sites": 4, "site_index": 2})]:
        with pytest.raises(Refusal, match="^spec_changed: "):
            restarted.check_run("r", changed, **layout)
    assert restarted.refusals == {"spec_changed": 3}
    restarted.check_run("r", spec())  # no layout given: the spec alone is held to


def test_the_first_layout_given_is_kept_and_an_in_memory_policy_holds_the_spec_too():
    policy = SitePolicy(PolicyConfig(), {1: KEY})
    policy.check_run("r", spec())
    policy.check_run("r", spec(), num_sites=4, site_index=0)
    assert policy.joined.get("r").num_sites == 4
    with pytest.raises(Refusal, match="^spec_changed: "):
        policy.check_run("r", spec(), num_sites=5, site_index=0)
    with pytest.raises(Refusal, match="^spec_changed: "):
        policy.check_run("r", spec(model={"width": 16}))


@pytest.mark.parametrize("damage", [
    "{not json", "[]", json.dumps({"r": {"spec": "ab", "num_sites": None, "site_index": None}}),
    json.dumps({"r": {"spec": "0" * 64, "num_sites": "4", "site_index": None}}),
    json.dumps({"r": {"spec": "0" * 64}}),
])
def test_a_damaged_record_of_joined_runs_stops_the_site(tmp_path, damage):
    path = tmp_path / "run_specs.json"
    path.write_text(damage)
    with pytest.raises(StateError, match="unreadable record of joined runs"):
        PersistentJoinedRuns(path)


# ---- what the site applies itself: the update ceiling and its own training seed -----------------


def site_worker(tmp_path, *, ceiling=100.0, train_seed=None, max_update_norm=None):
    from asagiri.site import SiteWorker
    from asagiri.wire.messages import Welcome

    key = Identity.generate()
    key.save(tmp_path / "k.key")
    cfg = SiteConfig(site_id=1, identity_key=tmp_path / "k.key", state_dir=tmp_path / "state",
                     coordinator={"public_key": key.public.hex()}, peers={1: key.public.hex()},
                     policy={"bounds": {"max_update_norm": ceiling}}, train_seed=train_seed)
    fed = FederationConfig.model_validate({
        "model": {"width": 8, "norm": "group"}, "train": {"batch_size": 16, "max_update_norm": max_update_norm},
        "data": {"dataset": "synthetic", "synthetic_samples": 64, "partition": {"scheme": "iid"}},
    })
    run = RunSpec.of(fed)
    worker = SiteWorker(cfg, Welcome("r", 0, 1, run.wire()), run)
    params = {k: v.detach().numpy().copy() for k, v in worker.model.state_dict().items() if k in worker.shared}
    return worker, params


def test_the_site_applies_its_update_ceiling_even_when_the_spec_sets_none(tmp_path):
    from asagiri.params import update_norm

    free, params = site_worker(tmp_path / "a", train_seed=1)
    delta, _ = free.train(FitIns(1, 1, params, {"mu": 0.0, "seed": 0}))
    norm = update_norm(delta)
    assert 0 < norm < 100.0  # the default ceiling does not bind an ordinary round
    for ceiling, asked in [(norm / 10, None), (norm / 10, norm / 2), (norm / 2, norm / 10)]:
        worker, _ = site_worker(tmp_path / f"{ceiling}-{asked}", ceiling=ceiling, train_seed=1, max_update_norm=asked)
        assert worker.update_bound == min(ceiling, asked or ceiling)
        bounded, _ = worker.train(FitIns(1, 1, params, {"mu": 0.0, "seed": 0}))
        assert update_norm(bounded) == pytest.approx(min(ceiling, asked or ceiling), rel=1e-4)


def test_the_coordinators_seed_does_not_choose_the_sites_training(tmp_path):
    worker, params = site_worker(tmp_path / "fixed", train_seed=7)
    one, _ = worker.train(FitIns(1, 1, params, {"mu": 0.0, "seed": 1}))
    two, _ = worker.train(FitIns(1, 1, params, {"mu": 0.0, "seed": 2**62}))
    assert all(np.array_equal(one[k], two[k]) for k in one)  # the site's seed, not the coordinator's
    other, _ = site_worker(tmp_path / "other", train_seed=8)
    three, _ = other.train(FitIns(1, 1, params, {"mu": 0.0, "seed": 1}))
    assert not all(np.array_equal(one[k], three[k]) for k in one)  # the coordinator's seed alone is not it
    fresh, _ = site_worker(tmp_path / "fresh")  # no train_seed: the OS draws one every round
    ins = FitIns(1, 1, params, {"mu": 0.0, "seed": 1})
    assert len({fresh.round_seed(ins) for _ in range(4)}) == 4
    assert worker.round_seed(ins) == worker.round_seed(FitIns(1, 1, params, {"seed": 5})) != worker.round_seed(
        FitIns(2, 1, params, {}))


def test_scaffold_is_joined_only_by_a_site_that_derives_its_models():
    """SCAFFOLD's server control variate comes from the models a site derives; a site that takes the
    coordinator's models on trust would have no c of its own, and a coordinator could choose it."""
    assert check(strategy={"scaffold": True}).strategy.scaffold
    with pytest.raises(Refusal, match="SCAFFOLD") as exc:
        check(PolicyConfig(derive_models=False), strategy={"scaffold": True})
    assert exc.value.rule == "derive_models"
