"""Models the site derives itself (SPEC §6.9, ``policy.derive_models``): ``W_0`` from the run alone,
the trajectory's pending and committed steps, and the machine's refusals of any other model.

Against real site processes and a scripted coordinator: ``tests/secagg/test_derived_attack.py``."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from asagiri.causes import Rule
from asagiri.client.machine import Evaluate, Send, SetUp, Train
from asagiri.config import FederationConfig, PolicyConfig, RunSpec, SecAggConfig
from asagiri.initial import initial_key, initial_params
from asagiri.local import lay_out
from asagiri.policy import SitePolicy
from asagiri.secagg.binding import params_digest
from asagiri.secagg.inmemory import LocalRound
from asagiri.site import SiteWorker
from asagiri.site.trajectory import Trajectory
from asagiri.wire.messages import Decline, EvaluateIns, FitIns, ModelAt, Welcome

from .test_machine import PARAMS, machine, sent, welcome


def test_w0_is_the_same_bits_at_the_coordinator_and_at_a_site_and_a_function_of_the_run(tmp_path):
    fed, sites = lay_out(tmp_path, sites=3, rounds=1, overrides=["model.width=8"])
    spec = RunSpec.of(fed).wire()
    worker = SiteWorker(sites[1], Welcome(fed.run_id, 0, 3, spec), RunSpec.model_validate(spec))
    torch.manual_seed(0)  # the global generator plays no part
    coordinator = initial_params(fed)
    assert params_digest(worker.initial) == params_digest(coordinator)
    torch.rand(5)
    assert params_digest(initial_params(fed)) == params_digest(coordinator)
    other = initial_params(fed.model_copy(update={"run_id": "another-run"}))
    assert params_digest(other) != params_digest(coordinator)
    # the model's tensors decide it, not the rest of the spec: runs under one id can be compared
    assert initial_key(fed.run_id, spec) == initial_key(fed.run_id, {**spec, "rounds": spec["rounds"] + 1})
    wider = {**spec, "model": {**spec["model"], "width": 16}}
    assert initial_key(fed.run_id, spec) != initial_key(fed.run_id, wider)
    # torch's default initialisation's law: uniform on +-1/sqrt(fan_in), so variance 1/(3 fan_in)
    head = coordinator["head.weight"]
    fan_in = head.shape[1]
    assert abs(head).max() <= 1 / np.sqrt(fan_in)
    assert head.var() == pytest.approx(1 / (3 * fan_in), rel=0.25)


def _verified_sum(dim: int):
    """A sum that site 1 of an in-memory round verified, on the model ``{"w": zeros(dim)}``."""
    fed = LocalRound(ids=[1, 2, 3], dim=dim, secagg=SecAggConfig(), min_clients=3,
                     policy=partial(SitePolicy, PolicyConfig(require_batches=False)))
    rng = np.random.default_rng(1)
    server = fed.deliver({i: (rng.normal(0, 0.05, dim).astype(np.float32), 8) for i in fed.ids})
    assert server.result is not None, server.abort_reason
    return fed, fed.clients[1].verified


def test_a_verified_step_is_pending_until_the_round_is_committed_and_only_committed_steps_persist(tmp_path):
    fed, proven = _verified_sum(50)
    w0 = fed.fit.params
    strategy = RunSpec.of(FederationConfig()).strategy
    path = tmp_path / "trajectory.npz"
    t = Trajectory(run_id="r", spec_digest=b"s" * 32, initial=w0, strategy=strategy, path=path)
    assert t.current.round == 0 and t.current.digest == params_digest(w0)
    # a sum of a round on another model is no step of this trajectory
    assert not t.verified(1, bytes(32), proven.total, proven.digest, proven.plan, 3)
    assert t.verified(1, proven.trained_on, proven.total, proven.digest, proven.plan, 3)
    step = t.pending.model
    assert t.current.round == 0 and t.known(step.digest) is step and not path.exists()
    t.recorded(1, b"another sum")  # a record naming another sum: the round was run again without it
    assert t.pending is None and t.current.round == 0 and not path.exists()
    # a coordinator that crashed before recording runs the round again from W_0: the step is dropped
    assert t.verified(1, proven.trained_on, proven.total, proven.digest, proven.plan, 3)
    assert t.train_on(t.current.digest) and t.current.round == 0 and t.pending is None
    # ... and the rerun's own sum (here the same) replaces a pending step of the same round
    assert t.verified(1, proven.trained_on, proven.total, proven.digest, proven.plan, 3)
    assert t.verified(1, proven.trained_on, proven.total, b"the rerun's sum", proven.plan, 3)
    assert t.pending.sum_digest == b"the rerun's sum"
    assert t.verified(1, proven.trained_on, proven.total, proven.digest, proven.plan, 3)
    step = t.pending.model
    # the record naming the verified sum commits it, on disk too
    t.recorded(1, proven.digest)
    assert t.pending is None and t.current is step and path.exists()
    resumed = Trajectory(run_id="r", spec_digest=b"s" * 32, initial=w0, strategy=strategy, path=path)
    assert resumed.current.round == 1 and resumed.current.digest == step.digest
    # another run, or another W_0, starts again
    assert Trajectory(run_id="r2", spec_digest=b"s" * 32, initial=w0, strategy=strategy, path=path).current.round == 0
    other_w0 = {"w": np.ones(50, np.float32)}
    assert Trajectory(run_id="r", spec_digest=b"s" * 32, initial=other_w0, strategy=strategy,
                      path=path).current.round == 0
    # a FitIns on the pending model commits it: the coordinator kept the round
    t3 = Trajectory(run_id="r", spec_digest=b"s" * 32, initial=w0, strategy=strategy, path=None)
    t3.verified(1, proven.trained_on, proven.total, proven.digest, proven.plan, 3)
    assert t3.train_on(step.digest) and t3.current.digest == step.digest and t3.pending is None


def derived(tmp_path, **policy):
    m = machine(tmp_path, **policy)
    w = welcome(secagg=True)
    [setup] = m.welcome(w)
    assert isinstance(setup, SetUp)
    return m, w


def test_the_site_trains_and_evaluates_only_the_model_it_derived(tmp_path):
    m, w = derived(tmp_path)
    assert sent(m.set_up(w, None, examples=100, initial=PARAMS)) == [ModelAt(0, params_digest(PARAMS))]
    crafted = {"w": np.array([0.0, 1e-6, 0.0], np.float32)}  # W perturbed: a "same model" check misses it
    assert sent(m.receive(FitIns(1, 1, crafted, {}))) == [Decline(1, 1, Rule.DERIVE_MODELS, False)]
    ins = FitIns(1, 2, PARAMS, {})
    assert Train(ins, secure=True) in m.receive(ins)
    # evaluation: the derived model once per split, nothing else
    assert sent(m.receive(EvaluateIns(1, crafted, "val"))) == [Decline(1, 0, Rule.DERIVE_MODELS, False)]
    ev = EvaluateIns(1, PARAMS, "val")
    assert m.receive(ev) == [Evaluate(ev)]
    assert sent(m.receive(EvaluateIns(1, PARAMS, "val"))) == [Decline(1, 0, Rule.DERIVE_MODELS, False)]
    test = EvaluateIns(1, PARAMS, "test")
    assert m.receive(test) == [Evaluate(test)]


def test_a_fitins_that_came_while_the_site_set_up_is_checked_when_set_up_ends(tmp_path):
    m, w = derived(tmp_path)
    crafted = {"w": np.ones(3, np.float32)}
    ins = FitIns(1, 1, crafted, {})
    assert Train(ins, secure=True) in m.receive(ins)  # the model is not known yet: training waits for set-up
    assert sent(m.set_up(w, None, examples=100, initial=PARAMS)) == [
        Decline(1, 1, Rule.DERIVE_MODELS, False), ModelAt(0, params_digest(PARAMS))]
    assert not m.wants(ins)  # the waiting training sees it declined


def test_control_a_site_whose_policy_allows_foreign_models_trains_on_them(tmp_path):
    m, w = derived(tmp_path, derive_models=False)
    assert m.set_up(w, None, examples=100, initial=PARAMS) == []  # nothing derived, nothing to say
    crafted = {"w": np.ones(3, np.float32)}
    ins = FitIns(1, 1, crafted, {})
    assert Train(ins, secure=True) in m.receive(ins)
    ev = EvaluateIns(1, crafted, "val")
    assert m.receive(ev) == [Evaluate(ev)] and m.receive(ev) == [Evaluate(ev)]


def test_a_sent_model_is_compared_bit_for_bit(tmp_path):
    m, w = derived(tmp_path)
    m.set_up(w, None, examples=100, initial=PARAMS)
    negative_zero = {"w": np.array([-0.0, 0.0, 0.0], np.float32)}  # equal as numbers, not as bits
    assert any(isinstance(a, Send) and isinstance(a.msg, Decline) for a in m.receive(FitIns(1, 1, negative_zero, {})))


def test_an_evaluation_of_round_0_is_declined_with_a_valid_message_and_counts_survive_a_restart(tmp_path):
    """Red-team findings: EvaluateIns(0, ...) of a foreign model had the site build Decline(0, 0),
    which the wire refused, and the once-per-model count lived in memory only."""
    m, w = derived(tmp_path)
    m.models.folder = tmp_path
    m.set_up(w, None, examples=100, initial=PARAMS)
    assert sent(m.receive(EvaluateIns(0, {"w": np.ones(3, np.float32)}, "val"))) == [
        Decline(0, 0, Rule.DERIVE_MODELS, False)]
    ev = EvaluateIns(0, PARAMS, "val")
    assert m.receive(ev) == [Evaluate(ev)]
    # the site restarts: a new machine, the same state_dir
    m2, w2 = derived(tmp_path / "again")
    m2.models.folder = tmp_path
    m2.set_up(w2, None, examples=100, initial=PARAMS)
    assert sent(m2.receive(EvaluateIns(1, PARAMS, "val"))) == [Decline(1, 0, Rule.DERIVE_MODELS, False)]
    test = EvaluateIns(1, PARAMS, "test")
    assert m2.receive(test) == [Evaluate(test)]


def test_each_run_keeps_its_own_trajectory_and_evaluations(tmp_path):
    """A red-team finding: one trajectory file for every run let a detour through another run id
    reset the first run's model to W_0 and forget its evaluations."""
    from asagiri.client.derived import DerivedModels
    from asagiri.config import RunSpec
    from asagiri.errors import Refusal

    spec = RunSpec.of(FederationConfig())
    models = DerivedModels(SitePolicy(PolicyConfig()), tmp_path)
    ins = EvaluateIns(1, PARAMS, "val")

    def join(run):
        welcome = Welcome(run, 0, 3, spec.wire())
        models.joined(welcome, spec)
        assert not models.ready  # until its set-up ends, nothing is checked against another run's models
        models.start(welcome, spec, PARAMS)

    join("run-a")
    models.check_evaluate(ins)  # run a's first evaluation of W_0
    join("run-b")
    models.check_evaluate(ins)  # run b counts its own
    join("run-a")
    with pytest.raises(Refusal, match="evaluated on val already"):
        models.check_evaluate(ins)  # run a's count survived the detour through run b
    assert len(list(tmp_path.glob("trajectory-*.evaluated.json"))) == 2


def test_a_sum_record_is_not_taken_for_the_sessions_first_round_message(tmp_path):
    """Found by the end-to-end hostile-site test: a SumRecord arriving first in a session (the
    coordinator sends a round's sum before its record) made the site conclude that no record of the
    rounds it contributed to would come, and count them against max_unrecorded."""
    from asagiri.wire.messages import SumRecord

    m, w = derived(tmp_path)
    m.set_up(w, None, examples=100, initial=PARAMS)
    record = SumRecord(1, 1, [1, 2, 3], {}, [1, 2, 3], {"s": np.zeros(4, "<u4")}, [])
    assert m.receive(record) == []
    assert m.witness._run(m.run_id).joined  # still waiting for the session's first record
    m.receive(FitIns(1, 1, PARAMS, {}))
    assert not m.witness._run(m.run_id).joined
