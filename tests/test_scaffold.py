"""SCAFFOLD (Karimireddy et al. 2020) as secure aggregation allows it: the server's step on
tiny parameters by hand, the sites' correction and control variates in training, and a whole
secure federation in which the coordinator's view of the control variates is their sum only."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest
import torch

from asagiri.aggregate import RunningSum, server_step
from asagiri.config import FederationConfig, StrategyConfig
from asagiri.local import lay_out, run_local
from asagiri.params import load_tensors, summed_layout
from asagiri.secagg import server as secagg_server
from asagiri.secagg.quantize import dequantize
from asagiri.site.control import OwnControl
from asagiri.train.loop import DriftTerms, train_local
from asagiri.wire.messages import MaskedInput


def test_the_server_control_variate_moves_by_the_mean_control_delta_and_the_model_as_without():
    w = {"w": np.array([0.5, -1.0], np.float32), "bn.running_mean": np.array([0.1], np.float32)}
    # two sites' (update, control delta), each weighted by its count (2 and 1), as a round sums them
    sites = [({"w": [0.2, 0.4], "bn.running_mean": [0.3]}, [1.0, -2.0], 2),
             ({"w": [-0.1, 0.1], "bn.running_mean": [0.0]}, [0.5, 0.5], 1)]
    summed = RunningSum(summed_layout(w, controls=True))
    for update, control, n in sites:
        summed.add({"w": n * np.array(update["w"], np.float32), "bn.running_mean": n * np.array(
            update["bn.running_mean"], np.float32), "c/w": n * np.array(control, np.float32)}, n)
    before = {"c/w": np.array([0.25, 0.25], np.float32)}
    for name in ("fedavg", "fedadam"):
        plain = StrategyConfig(name=name)
        with_controls = StrategyConfig(name=name, scaffold=True)
        expected_model, opt_state = server_step(w, None, _without_controls(summed), plain)
        model, state = server_step(w, before, summed, with_controls)
        assert all(np.array_equal(model[k], expected_model[k]) for k in w)  # the model's step is the optimiser's
        # c += (2 * [1, -2] + 1 * [0.5, 0.5]) / 3, by hand
        np.testing.assert_allclose(state["c/w"], [0.25 + 2.5 / 3, 0.25 - 3.5 / 3], rtol=1e-6)
        assert {k for k in state if not k.startswith("c/")} == set(opt_state or {})  # FedAdam's m/, v/ beside it
    first, state = server_step(w, None, summed, StrategyConfig(scaffold=True))  # from zero
    np.testing.assert_allclose(state["c/w"], [2.5 / 3, -3.5 / 3], rtol=1e-6)


def test_the_server_control_variate_is_carried_across_a_checkpoint_and_resume():
    """Three rounds by hand (c += mean control delta, FedAvgM's momentum beside it), with the
    strategy rebuilt from its state() before round 2, as the driver's checkpoint and --resume do."""
    from asagiri.strategy.base import StrategyState, build_strategy

    cfg = FederationConfig(min_clients=2, strategy={"name": "fedavgm", "server_momentum": 0.5, "scaffold": True})
    start = {"w": np.array([0.5, -0.2], np.float32)}
    strategy = build_strategy(cfg, dict(start))
    w, velocity, c = start["w"].astype(np.float64), np.zeros(2), np.zeros(2)
    rounds = [(np.array([0.2, -0.1]), np.array([1.0, 0.5])), (np.array([-0.3, 0.1]), np.array([-0.5, 0.25])),
              (np.array([0.1, 0.1]), np.array([0.2, -0.2]))]
    for rnd, (d, dc) in enumerate(rounds, start=1):
        if rnd == 2:
            saved = strategy.state()
            strategy = build_strategy(cfg, dict(start))
            strategy.load_state(StrategyState(saved.params, saved.velocity))
        out = strategy.aggregate_fit(rnd, RunningSum.from_totals({"w": d * 2, "c/w": dc * 2}, 2, 2), [1, 2], [])
        velocity = 0.5 * velocity + d
        w, c = w + velocity, c + dc
        np.testing.assert_allclose(out["w"], w, rtol=1e-6)
        np.testing.assert_allclose(strategy.state().velocity["c/w"], c, rtol=1e-6)
    assert set(strategy.state().velocity) == {"w", "c/w"}  # the momentum and the control variate


def _without_controls(summed: RunningSum) -> RunningSum:
    out = RunningSum({})
    out._sum = {k: v for k, v in summed._sum.items() if not k.startswith("c/")}
    out.total_samples, out.count = summed.total_samples, summed.count
    return out


def test_scaffold_needs_secure_aggregation():
    with pytest.raises(ValueError, match="scaffold needs secure aggregation"):
        FederationConfig.model_validate({"strategy": {"scaffold": True}, "secagg": {"enabled": False}})


def test_a_step_takes_the_correction_and_the_control_variate_is_the_mean_raw_gradient():
    """Plain SGD on a linear least-squares model, by hand: w' = w - lr (g + c - c_i), and the
    mean gradient tracked is of the gradients before the correction: Option II's
    c_i - c + (x - y)/(K lr), which for plain SGD is the same thing."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    correction = {"weight": torch.tensor([[0.3, -0.2, 0.1]])}
    terms = DriftTerms(model, 0.0, None, correction)
    w0 = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y, reduction="sum").backward()
        grads.append(model.weight.grad.detach().clone())
        terms.add_gradient()
        opt.step()
    w = w0.clone()  # the same three steps by hand
    for _ in range(3):
        g = 2 * (x @ w.T - y).T @ x
        w = w - 0.1 * (g + correction["weight"])
    torch.testing.assert_close(model.weight.detach(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms.mean_gradient()["weight"], torch.stack(grads).mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(((w0 - model.weight.detach()) / (3 * 0.1)).numpy(),
                               terms.mean_gradient()["weight"] + correction["weight"].numpy(), rtol=1e-5)


def test_train_local_returns_the_mean_gradient_only_under_scaffold():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    data = _split(32)
    plain = train_local(model, data, steps=2, batch_size=8, lr=0.01, augment=False, seed=0)
    assert plain.mean_gradient is None
    zero = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    tracked = train_local(model, data, steps=2, batch_size=8, lr=0.01, augment=False, seed=0, correction=zero)
    assert set(tracked.mean_gradient) == {"1.weight", "1.bias"}
    assert all(np.abs(v).max() > 0 for v in tracked.mean_gradient.values())


def test_under_dp_sgd_scaffold_is_post_processing_and_charges_what_the_round_charges_without_it():
    """The correction and the mean gradient come after Opacus' clipping and noise: the round's
    privacy parameters (what the ledger charges) are the same with SCAFFOLD and without."""
    from asagiri.privacy.engine import dp_compatible, train_dp

    results = []
    for correction in (None, {"1.weight": torch.full((2, 16), 0.5), "1.bias": torch.zeros(2)}):
        torch.manual_seed(0)
        model, _ = dp_compatible(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)))
        results.append(train_dp(model, _split(64), steps=4, expected_batch=16, lr=0.05, optimizer="sgd",
                                momentum=0.0, noise_multiplier=1.1, max_grad_norm=1.0, augment=False, seed=3,
                                correction=correction))
    plain, corrected = results
    assert (plain.steps, plain.sample_rate, plain.noise_multiplier) == \
        (corrected.steps, corrected.sample_rate, corrected.noise_multiplier)
    assert plain.mean_gradient is None and set(corrected.mean_gradient) == {"1.weight", "1.bias"}


def test_under_dp_sgd_the_control_variate_is_of_the_clipped_noisy_gradient():
    """c_i+ must be the gradient Opacus released, never the raw one: with noise off, each step's
    gradient is a sum of per-example gradients clipped to 0.01 over the expected batch, so their
    mean is at most 0.01 x (largest batch / expected batch); the raw gradients are far larger.
    With noise on, the same seed gives another mean gradient."""
    from asagiri.privacy.engine import dp_compatible, train_dp

    def mean_gradient(noise: float, clip: float) -> np.ndarray:
        torch.manual_seed(0)
        model, _ = dp_compatible(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)))
        zero = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
        r = train_dp(model, _split(64), steps=4, expected_batch=16, lr=0.05, optimizer="sgd", momentum=0.0,
                     noise_multiplier=noise, max_grad_norm=clip, augment=False, seed=3, correction=zero)
        return np.concatenate([v.ravel() for v in r.mean_gradient.values()])

    clipped, loose = mean_gradient(0.0, 0.01), mean_gradient(0.0, 100.0)
    assert np.linalg.norm(clipped) <= 0.01 * 64 / 16
    assert np.linalg.norm(loose) > 10 * np.linalg.norm(clipped)  # the bound above is the clipping's doing
    assert not np.allclose(mean_gradient(1.1, 0.01), clipped, atol=1e-4)  # the noise reaches c_i+


def _split(n: int):
    from asagiri.splits import Split

    g = torch.Generator().manual_seed(1)
    return Split(torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 2, (n,), generator=g))


def test_an_own_control_variate_is_adopted_only_when_its_round_kept_this_sites_input(tmp_path):
    template = {"w": np.zeros(2, np.float32), "bn.running_var": np.ones(1, np.float32)}
    own = OwnControl(run_id="r", spec_digest=b"d", template=template, path=tmp_path / "c.npz")
    assert set(own.value) == {"w"}  # none for running statistics
    sent = own.propose(1, {"w": np.array([1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(sent["c/w"], [1.0, 2.0])
    own.committed(1, included=False)  # the sum left this site out: c_i stays
    np.testing.assert_array_equal(own.value["w"], [0, 0])
    own.propose(2, {"w": np.array([3.0, 1.0], np.float32)})
    own.committed(2, included=True)
    np.testing.assert_array_equal(own.value["w"], [3, 1])
    np.testing.assert_array_equal(own.correction({"c/w": np.array([1.0, 1.0], np.float32)})["w"], [-2, 0])
    again = OwnControl(run_id="r", spec_digest=b"d", template=template, path=tmp_path / "c.npz")
    assert again.round == 2 and np.array_equal(again.value["w"], [3, 1])  # a restarted site goes on with it
    other = OwnControl(run_id="r2", spec_digest=b"d", template=template, path=tmp_path / "c.npz")
    assert other.round == 0 and not other.value["w"].any()  # another run's is not this one's


FAST = ["data.dataset=synthetic", "data.synthetic_samples=192", "data.partition.scheme=iid", "model.width=8",
        "train.local_steps=5", "train.batch_size=16", "strategy.scaffold=true", "timeouts.wait_for_sites=60"]


def test_a_secure_federation_sums_the_control_variates_and_the_coordinator_sees_only_the_sum(tmp_path, monkeypatch):
    """Three sites, two rounds.  Each site's control delta, as the site computed it, against what
    the coordinator received: a masked input whose control block, read as if it were plain, is
    unrelated to the site's; and a sum (the server's c) equal to the mean of the sites' own
    control variates, read from their state after the run, within the quantisation step."""
    proposed: dict[tuple[str, int], np.ndarray] = {}  # (site state dir, round) -> the delta it sent
    received: dict[tuple[int, int], tuple[np.ndarray, object]] = {}  # (site, round) -> masked ring vector, plan
    propose, receive = OwnControl.propose, secagg_server.ServerStateMachine.receive

    def record_proposal(self, rnd, mean_gradient):
        out = propose(self, rnd, mean_gradient)
        proposed[(str(self.path.parent), rnd)] = np.concatenate([v.ravel() for v in out.values()])
        return out

    def record_masked(self, site, msg):
        if isinstance(msg, MaskedInput):
            received[(site, msg.round)] = (msg.vector["y"].copy(), self.plan)
        return receive(self, site, msg)

    monkeypatch.setattr(OwnControl, "propose", record_proposal)
    monkeypatch.setattr(secagg_server.ServerStateMachine, "receive", record_masked)
    cfg, sites = lay_out(tmp_path, sites=3, rounds=2, overrides=FAST)
    summary = anyio.run(run_local, cfg, sites)
    assert summary["status"] == "completed", summary
    params, state, _ = load_tensors(Path(cfg.run_dir) / "checkpoint.npz")
    layout = summed_layout(params, controls=True)
    control_keys = [k for k in layout if k.startswith("c/")]
    assert control_keys and set(control_keys) <= set(state)
    server_c = np.concatenate([state[k].ravel() for k in control_keys])
    # each site's own c_i, from its state directory; round 1 starts every c_i at zero
    own = []
    for site in sites.values():
        (path,) = Path(site.state_dir).glob("control-*.npz")
        value, _, kept = load_tensors(path)
        assert kept["round"] == 2
        own.append(np.concatenate([value[k[2:]].ravel() for k in control_keys]))
    # count "one": c = the mean of the c_i, within a quantisation step a round
    step = 1 / next(iter(received.values()))[1].scale
    assert np.abs(server_c).max() > 20 * step  # far above the tolerance: a c_i not adopted would show
    np.testing.assert_allclose(server_c, np.mean(own, axis=0), atol=2 * step)
    # the coordinator's view of one site's control delta: its masked input, read as if plain
    n_model = sum(v.size for k, v in layout.items() if not k.startswith("c/"))
    by_site_dir = {i: str(Path(s.state_dir)) for i, s in sites.items()}
    for (site, rnd), (vector, plan) in received.items():
        sent = proposed[(by_site_dir[site], rnd)]
        read, _ = dequantize(vector, plan)
        masked_block = read[n_model:]
        assert masked_block.shape == sent.shape
        corr = abs(np.corrcoef(masked_block, sent)[0, 1])
        assert corr < 0.2 and np.abs(masked_block - sent).max() > 100 * np.abs(sent).max(), (site, rnd, corr)
    assert len(received) == 6
