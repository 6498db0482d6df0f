"""FedBN keeps normalisation layers off the wire; FedProx with mu = 0 is FedAvg."""

import numpy as np
import pytest
import torch

from asagiri.config import FederationConfig, PolicyConfig, RunSpec, SiteConfig
from asagiri.models import build, is_norm_key, shared_keys
from asagiri.params import flatten
from asagiri.policy import SitePolicy
from asagiri.site import SiteWorker
from asagiri.train import train_local
from asagiri.wire import codec
from asagiri.wire.crypto import Identity
from asagiri.wire.messages import FitIns, Welcome


def worker(tmp_path, *, fedbn, norm="batch"):
    key = Identity.generate()
    key.save(tmp_path / "k.key")
    cfg = SiteConfig(site_id=1, identity_key=tmp_path / "k.key", state_dir=tmp_path / "state",
                     coordinator={"public_key": key.public.hex()}, peers={1: key.public.hex()})
    fed = FederationConfig.model_validate({
        "model": {"name": "small_cnn", "norm": norm, "width": 8, "groups": 4},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 1e-3, "augment": False},
        "strategy": {"name": "fedavg", "mu": 0.0, "fedbn": fedbn},
        "data": {"dataset": "synthetic", "synthetic_samples": 64, "image_size": 28,
                 "partition": {"scheme": "iid", "alpha": 1.0, "seed": 0}},
    })
    spec = RunSpec.of(fed)
    return SiteWorker(cfg, Welcome("r", 0, 1, spec.wire()), spec)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_fedbn_norm_layers_never_reach_the_wire(tmp_path, norm):
    w = worker(tmp_path, fedbn=True, norm=norm)
    norm_keys = [k for k in w.model.state_dict() if is_norm_key(w.model, k)]
    assert norm_keys, "the model has normalisation layers"
    params = {k: w.model.state_dict()[k].numpy().copy() for k in w.shared}
    res = w.fit(FitIns(1, 1, params, {}), SitePolicy(PolicyConfig(count="exact")))
    header, arrays = codec.encode_header(res)
    sent = [spec.name for spec in codec.decode_header(header, max_payload_bytes=1 << 30).specs]
    assert sent and not set(sent) & set(norm_keys)
    # and under secure aggregation the masked vector covers exactly the shared tensors (+ count)
    delta, result = w.train(FitIns(1, 1, params, {}))
    assert flatten(delta).size == sum(p.size for p in params.values())
    # the local normalisation statistics did change, and stay on the site
    before = build("small_cnn", in_channels=1, num_classes=2, width=8, norm=norm, groups=4).state_dict()
    changed = [k for k in norm_keys if before[k].is_floating_point() and not torch.equal(before[k], w.model.state_dict()[k])]
    assert changed


def test_without_fedbn_norm_layers_are_shared(tmp_path):
    w = worker(tmp_path, fedbn=False)
    assert any(is_norm_key(w.model, k) for k in w.shared)


def test_fedprox_with_mu_zero_is_fedavg():
    from asagiri.data import load_site_data

    data = load_site_data(dataset="synthetic", path=None, site_index=0, num_sites=1, scheme="iid", alpha=1, seed=0)

    def run(**kw):
        torch.manual_seed(0)
        m = build("small_cnn", in_channels=1, num_classes=2, width=8, norm="group", groups=4)
        train_local(m, data.train, epochs=1, batch_size=32, lr=1e-2, augment=False, seed=3, **kw)
        return {k: v.clone() for k, v in m.state_dict().items()}

    plain, prox0, prox = run(), run(mu=0.0), run(mu=10.0)
    assert all(torch.equal(plain[k], prox0[k]) for k in plain)
    assert any(not torch.equal(plain[k], prox[k]) for k in plain)
    # the proximal term pulls towards the global weights: smaller distance from the start
    torch.manual_seed(0)
    start = build("small_cnn", in_channels=1, num_classes=2, width=8, norm="group", groups=4).state_dict()
    dist = lambda s: sum(float(((s[k] - start[k]) ** 2).sum()) for k in s if s[k].is_floating_point())  # noqa: E731
    assert dist(prox) < dist(plain)


def test_shared_keys_skip_integer_buffers():
    m = build("small_cnn", in_channels=1, num_classes=2, width=8, norm="batch", groups=4)
    assert not any(k.endswith("num_batches_tracked") for k in shared_keys(m, fedbn=False))



class DecayingFedAvg:  # the docs/strategies.md example, used through strategy.custom
    def __new__(cls, cfg, params):
        from asagiri.aggregate import apply_weighted_delta
        from asagiri.strategy.base import FedAvg, FitPlan

        class _Impl(FedAvg):
            def configure_fit(self, rnd, attempt, available):
                plan = super().configure_fit(rnd, attempt, available)
                return FitPlan(sites=plan.sites[:3] if len(plan.sites) > 3 else plan.sites, config=plan.config)

            def aggregate_fit(self, rnd, summed, survivors, dropped):
                lr = 1.0 / (1 + 0.1 * rnd)
                self.params, _ = apply_weighted_delta(self.params, summed.mean_delta(), server_lr=lr)
                return self.params

        return _Impl(cfg, params)


def test_custom_strategy_from_config():
    import numpy as np

    from asagiri.aggregate import RunningSum
    from asagiri.config import FederationConfig
    from asagiri.strategy.base import build_strategy

    cfg = FederationConfig(min_clients=2, strategy={"custom": "tests.test_strategies:DecayingFedAvg"})
    params = {"w": np.zeros(2, np.float32)}
    strategy = build_strategy(cfg, params)
    assert strategy.configure_fit(1, 1, [1, 2, 3, 4, 5]).sites == [1, 2, 3]
    summed = RunningSum.from_totals({"w": np.array([10.0, 20.0])}, 10, 2)
    out = strategy.aggregate_fit(10, summed, [1, 2], [])
    np.testing.assert_allclose(out["w"], [0.5, 1.0])  # server lr 1/(1 + 1) at round 10
    with pytest.raises(ValueError, match="strategy.custom"):
        build_strategy(FederationConfig(strategy={"custom": "no.such.module:X"}), params)


def test_fedavgm_leaves_running_statistics_at_the_plain_mean():
    """Momentum on a BatchNorm variance that shrinks each round would overshoot below zero."""
    import numpy as np

    from asagiri.aggregate import apply_weighted_delta

    params = {"conv.weight": np.zeros(3, np.float32), "bn.running_var": np.full(3, 1.0, np.float32),
              "bn.running_mean": np.zeros(3, np.float32)}
    velocity = None
    for _ in range(6):
        delta = {"conv.weight": np.ones(3, np.float32), "bn.running_var": -0.5 * params["bn.running_var"],
                 "bn.running_mean": np.full(3, 0.1, np.float32)}
        before = {k: v.copy() for k, v in params.items()}
        params, velocity = apply_weighted_delta(params, delta, server_lr=2.0, momentum=0.9, velocity=velocity)
        np.testing.assert_allclose(params["bn.running_var"], 0.5 * before["bn.running_var"])
        np.testing.assert_allclose(params["bn.running_mean"], before["bn.running_mean"] + 0.1, rtol=1e-6)
    assert (params["bn.running_var"] > 0).all()
    assert velocity is not None and set(velocity) == {"conv.weight"}
    # the weights did get momentum: 2 * (1 + 1.9 + 2.71 + ...) over six rounds
    expected = 2.0 * sum(sum(0.9**j for j in range(i + 1)) for i in range(6))
    np.testing.assert_allclose(params["conv.weight"], expected, rtol=1e-5)


def test_a_sites_impossible_metric_never_reaches_the_weighted_mean():
    """A hostile site reporting AUC 1e308 on 2 examples would make the mean inf, which the
    records refuse to write: the coordinator would crash. Such a value is left out."""
    import numpy as np

    from asagiri.strategy.base import build_strategy

    strategy = build_strategy(FederationConfig(), {"w": np.zeros(2, np.float32)})
    out = strategy.aggregate_evaluate(1, {1: (2, {"auc": 1e308, "loss": 0.5}), 2: (10, {"auc": 0.8, "loss": 1e300}),
                                          3: (10, {"auc": 0.6, "loss": 0.7})})
    assert out["auc"] == pytest.approx(0.7) and out["site_auc"] == {"2": 0.8, "3": 0.6}
    assert out["loss"] == pytest.approx((2 * 0.5 + 10 * 0.7) / 12)


def test_a_strategy_hands_over_and_takes_back_its_state():
    """What the driver checkpoints and restores goes through the declared state()/load_state()."""
    import numpy as np

    from asagiri.aggregate import RunningSum
    from asagiri.config import FederationConfig
    from asagiri.strategy.base import StrategyState, build_strategy

    cfg = FederationConfig(min_clients=2, strategy={"name": "fedavgm", "server_momentum": 0.9})
    strategy = build_strategy(cfg, {"w": np.zeros(2, np.float32)})
    assert strategy.state().velocity is None
    strategy.aggregate_fit(1, RunningSum.from_totals({"w": np.array([2.0, 4.0])}, 2, 2), [1, 2], [])
    saved = strategy.state()
    assert saved.velocity is not None
    fresh = build_strategy(cfg, {"w": np.zeros(2, np.float32)})
    fresh.load_state(StrategyState(saved.params, saved.velocity))
    for s in (strategy, fresh):
        s.aggregate_fit(2, RunningSum.from_totals({"w": np.array([2.0, 4.0])}, 2, 2), [1, 2], [])
    np.testing.assert_array_equal(fresh.state().params["w"], strategy.state().params["w"])
    np.testing.assert_array_equal(fresh.state().velocity["w"], strategy.state().velocity["w"])


def _hand_step(name, w, m, v, d, lr, b1, b2, tau):
    """Reddi et al. 2021, Algorithm 2, written out in float64 for one step."""
    m = b1 * m + (1 - b1) * d
    if name == "fedadam":
        v = b2 * v + (1 - b2) * d * d
    elif name == "fedyogi":
        v = v - (1 - b2) * d * d * np.sign(v - d * d)
    else:
        v = v + d * d
    return w + lr * m / (np.sqrt(v) + tau), m, v


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_the_adaptive_server_optimisers_take_the_papers_step(name):
    """FedAdam, FedYogi and FedAdagrad against their step written out by hand over three rounds
    (float64 here, float32 in the product: equal to 1e-6), running statistics at the plain mean,
    and their state carried across a checkpoint (state() / load_state())."""
    from asagiri.aggregate import RunningSum
    from asagiri.strategy.base import StrategyState, build_strategy

    cfg = FederationConfig(min_clients=2, strategy={"name": name, "server_lr": 0.05, "beta1": 0.8, "beta2": 0.95,
                                                    "tau": 0.01})
    assert cfg.strategy.server_lr == 0.05 and FederationConfig(strategy={"name": name}).strategy.server_lr == 0.01
    start = {"w": np.array([0.5, -0.2, 0.0], np.float32), "bn.running_mean": np.zeros(3, np.float32)}
    strategy = build_strategy(cfg, dict(start))
    w, m, v = start["w"].astype(np.float64), np.zeros(3), np.full(3, 0.01**2)
    deltas = [np.array([0.2, -0.1, 0.05]), np.array([-0.3, 0.1, 0.0]), np.array([0.1, 0.1, 0.4])]
    for rnd, d in enumerate(deltas, start=1):
        if rnd == 2:  # the checkpoint and --resume in between
            saved = strategy.state()
            strategy = build_strategy(cfg, dict(start))
            strategy.load_state(StrategyState(saved.params, saved.velocity))
        total = {"w": d * 4, "bn.running_mean": np.full(3, 0.4)}  # four samples' sum: the mean is d
        out = strategy.aggregate_fit(rnd, RunningSum.from_totals(total, 4, 2), [1, 2], [])
        w, m, v = _hand_step(name, w, m, v, d, 0.05, 0.8, 0.95, 0.01)
        np.testing.assert_allclose(out["w"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["bn.running_mean"], 0.1 * rnd, rtol=1e-6)
        assert out["w"].dtype == np.float32
    state = strategy.state().velocity
    assert set(state) == {"m/w", "v/w"}  # the moments of the weights only, never of the statistics
    np.testing.assert_allclose(state["m/w"], m, rtol=1e-5)
    np.testing.assert_allclose(state["v/w"], v, rtol=1e-5)


def test_proximal_term_momentum_and_fedbn_are_parts_any_server_optimiser_combines():
    """Issue 29: FedProx's mu reaches the sites whatever the server optimiser (it was sent only
    when the name was fedprox); the names fedprox and fedavgm require their part."""
    from asagiri.config import ConfigError
    from asagiri.strategy.base import build_strategy

    cfg = FederationConfig(min_clients=2, strategy={"name": "fedyogi", "mu": 0.05, "fedbn": True})
    plan = build_strategy(cfg, {"w": np.zeros(2, np.float32)}).configure_fit(1, 1, [1, 2, 3])
    assert plan.config["mu"] == 0.05 and RunSpec.of(cfg).strategy.fedbn
    for bad, why in [({"name": "fedprox"}, "needs strategy.mu > 0"),
                     ({"name": "fedavgm"}, "needs strategy.server_momentum > 0"),
                     ({"name": "fedadam", "server_momentum": 0.9}, "keeps its own first moment")]:
        with pytest.raises((ValueError, ConfigError), match=why):
            FederationConfig(strategy=bad)


def test_a_site_without_an_auc_says_so_and_the_record_names_it():
    """Issue 29: a site whose validation split holds one class has no AUC.  It left the mean and
    the plot with nothing said; it now sends ``auc_undefined`` and the round names it."""
    from asagiri.observe.report import _auc
    from asagiri.strategy.base import build_strategy
    from asagiri.train.loop import EvalResult

    one_class = EvalResult(4, 0.3, 1.0, None, np.zeros((4, 2)), np.zeros(4, int)).metrics()
    assert one_class["auc_undefined"] == 1.0 and "auc" not in one_class
    strategy = build_strategy(FederationConfig(), {"w": np.zeros(2, np.float32)})
    out = strategy.aggregate_evaluate(1, {1: (10, {"auc": 0.8, "loss": 0.5}), 3: (4, one_class)})
    assert out["site_auc"] == {"1": 0.8} and out["site_auc_undefined"] == [3]
    fig = _auc([{"round": 1, "auc": 0.8, "site_auc": {"1": 0.8}, "site_auc_undefined": [3]}])
    assert any("no AUC from sites [3]" in t.get_text() for t in fig.axes[0].texts)
