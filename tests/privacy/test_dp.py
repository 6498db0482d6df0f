import sys

import pytest
import torch
from opacus.accountants import RDPAccountant

from asagiri.data import load_site_data
from asagiri.data.loaders import Split
from asagiri.models import MODEL_NAMES, build, dp_norm
from asagiri.privacy.engine import dp_compatible, noise_for_target, steps_per_round, train_dp
from asagiri.privacy.ledger import PrivacyLedger


def test_ledger_epsilon_equals_opacus_accountant_for_the_same_history(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", delta=1e-5)
    opacus = RDPAccountant()
    history = [(1.1, 0.02, 50), (1.1, 0.02, 50), (0.9, 0.05, 20), (1.3, 0.01, 100)]
    for rnd, (sigma, q, steps) in enumerate(history, start=1):
        ledger.record(rnd, noise_multiplier=sigma, sample_rate=q, steps=steps)
        for _ in range(steps):
            opacus.step(noise_multiplier=sigma, sample_rate=q)
        assert ledger.epsilon() == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-9)


def test_ledger_cost_does_not_grow_with_rounds_of_the_same_noise():
    """A long run's rounds share (sigma, q): epsilon is evaluated on their summed steps, in constant time."""
    import time

    ledger = PrivacyLedger(None, delta=1e-5)
    opacus = RDPAccountant()
    for rnd in range(1, 201):
        ledger.record(rnd, noise_multiplier=1.26, sample_rate=0.076, steps=53)
    opacus.history = [(1.26, 0.076, 53 * 200)]
    t = time.perf_counter()
    eps = ledger.epsilon()
    elapsed = time.perf_counter() - t
    assert eps == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-9)
    assert elapsed < 1.0  # one entry's evaluation (~0.04 s), not 200 of them (~8 s)


def test_ledger_persists_and_a_restarted_site_keeps_spending(tmp_path):
    path = tmp_path / "state" / "privacy_ledger.json"
    first = PrivacyLedger(path, delta=1e-5)
    first.record(1, noise_multiplier=1.0, sample_rate=0.05, steps=40)
    first.record(2, noise_multiplier=1.0, sample_rate=0.05, steps=40)
    restarted = PrivacyLedger(path, delta=1e-5)
    assert restarted.epsilon() == pytest.approx(first.epsilon()) and restarted.epsilon() > 0
    restarted.record(3, noise_multiplier=1.0, sample_rate=0.05, steps=40)
    assert restarted.epsilon() > first.epsilon()
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(path, delta=1e-6)  # a ledger cannot silently change its delta


def test_budget_stop_fires_on_the_right_round():
    """sigma solved for exactly 5 rounds: rounds 1-5 fit the budget, round 6 would exceed it."""
    q, steps = 0.05, 20
    sigma = noise_for_target(target_epsilon=3.0, delta=1e-5, sample_rate=q, steps=5 * steps)
    ledger = PrivacyLedger(None, delta=1e-5)
    fired = None
    for rnd in range(1, 9):
        if ledger.would_exceed(noise_multiplier=sigma, sample_rate=q, steps=steps, target_epsilon=3.0):
            fired = rnd
            break
        ledger.record(rnd, noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert fired == 6
    assert ledger.epsilon() <= 3.0 * 1.01


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("norm", "groups", "width"), [("batch", 8, 8), ("batch", 4, 32), ("group", 4, 16)])
def test_the_coordinator_builds_what_opacus_makes_of_the_sites_model(name, norm, groups, width):
    """The coordinator builds the DP global model without Opacus (dp_norm); the sites convert theirs
    with Opacus (dp_compatible). Both must be the same model, tensor for tensor."""
    torch.manual_seed(0)
    fixed, _ = dp_compatible(build(name, in_channels=1, num_classes=2, width=width, norm=norm, groups=groups))
    torch.manual_seed(0)
    dp_norm_, dp_groups = dp_norm(name, norm, groups)
    direct = build(name, in_channels=1, num_classes=2, width=width, norm=dp_norm_, groups=dp_groups)
    a, b = fixed.state_dict(), direct.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    groups_of = lambda m: [x.num_groups for x in m.modules() if isinstance(x, torch.nn.GroupNorm)]  # noqa: E731
    assert groups_of(fixed) == groups_of(direct)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_batchnorm_models_are_converted_and_train(name):
    torch.manual_seed(0)
    model = build(name, in_channels=1, num_classes=2, width=8, norm="batch", groups=4)
    fixed, changed = dp_compatible(model)
    assert changed
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fixed.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in fixed.modules())
    data = load_site_data(dataset="synthetic", path=None, site_index=0, num_sites=4, scheme="iid", alpha=1,
                          seed=0, image_size=32)
    before = {k: v.clone() for k, v in fixed.state_dict().items()}
    q, steps = steps_per_round(len(data.train), 32, 1)
    r = train_dp(fixed, data.train, epochs=1, expected_batch=32, lr=1e-2, optimizer="sgd", momentum=0.0,
                 noise_multiplier=1.0, max_grad_norm=1.0)
    assert r.steps == steps and r.sample_rate == q
    assert any(not torch.equal(before[k], v) for k, v in fixed.state_dict().items())
    assert list(fixed.state_dict()) == list(before)  # unwrapped: same keys as before DP


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_augmentation_multiplicity_averages_each_examples_copies_before_clipping():
    from opacus import GradSampleModule

    from asagiri.privacy.engine import _average_copies
    from asagiri.train.loop import loss_fn

    torch.manual_seed(0)
    model = build("small_cnn", in_channels=1, num_classes=2, width=8, norm="group", groups=4)
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 2, (5,))
    once = GradSampleModule(model)
    loss_fn(once(x), y, "binary").backward()
    want = [p.grad_sample.clone() for p in once.parameters()]
    once._close()
    # Three identical copies of each example: the averaged per-example gradient is the example's own.
    thrice = GradSampleModule(model)
    loss_fn(thrice(x.repeat_interleave(3, 0)), y.repeat_interleave(3, 0), "binary").backward()
    _average_copies(thrice, 5, 3)
    for p, w in zip(thrice.parameters(), want, strict=True):
        assert p.grad_sample.shape == w.shape
        torch.testing.assert_close(p.grad_sample, w, rtol=1e-4, atol=1e-6)
    thrice._close()


def test_dp_training_with_multiplicity_runs_and_keeps_the_sample_rate():
    torch.manual_seed(0)
    model = build("small_cnn", in_channels=1, num_classes=2, width=8, norm="group", groups=4)
    data = Split(torch.rand(64, 1, 28, 28), torch.randint(0, 2, (64,)))
    r = train_dp(model, data, epochs=1, expected_batch=16, lr=1e-3, optimizer="adam", momentum=0.9,
                 noise_multiplier=1.0, max_grad_norm=1.0, multiplicity=4)
    assert (r.steps, r.sample_rate) == (4, 0.25)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dp_federation_with_secure_aggregation_stops_when_budgets_run_out(tmp_path):
    """3 sites over TCP, secure aggregation on, DP-SGD with a fixed sigma and a budget for 2 rounds of 5."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from tests.e2e.harness import LOCAL_STEPS, Federation

    # synthetic 512 / 3 sites: 171 or 170 images each, the harness's fixed steps a round
    q, steps = steps_per_round(171, 64, steps=LOCAL_STEPS)
    sigma = noise_for_target(target_epsilon=4.0, delta=1e-5, sample_rate=q, steps=2 * steps)
    fed = Federation(tmp_path / "run", sites=3, rounds=5, overrides=[
        "data.synthetic_samples=512", "dp.enabled=true", "dp.target_epsilon=4.0", f"dp.noise_multiplier={sigma}",
        "min_clients=2", "model.width=8",
    ], site_policy={"report_privacy": True})  # the sites agree to send epsilon and sigma
    try:
        fed.start_coordinator()
        for s in (1, 2, 3):
            fed.start_site(s)
        events = fed.events()
        codes = fed.wait_all()
    finally:
        fed.kill_all()
    assert codes["coordinator"] == 0, fed.logs()
    records = fed.metrics()
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["secure_aggregation"] for r in records)
    assert set(records[-1]["epsilon"]) == {"1", "2", "3"}
    assert all(e <= 4.0 * 1.01 for e in records[-1]["epsilon"].values())
    summary = fed.summary()
    assert summary["status"] == "budget_exhausted" and summary["exhausted"] == [1, 2, 3] and summary["refused"] == {}
    assert set(summary["epsilon"]) == {"1", "2", "3"} and set(summary["noise_multiplier"]) == {"1", "2", "3"}
    [ended] = [e for e in events if e["event"] == "FederationEnded"]
    assert ended["status"] == "budget_exhausted" and "spent their privacy budget" in ended["message"]
    refused = [e for e in events if e["event"] == "SiteRefused"]
    assert {e["site"] for e in refused} == {1, 2, 3} and all(e["rule"] == "privacy_budget" and e["permanent"]
                                                             for e in refused)
    audit = fed.audit()
    completed = [a for a in audit if a["kind"] == "round_completed"]
    assert [a["round"] for a in completed] == [1, 2] and set(completed[-1]["epsilon"]) == {"1", "2", "3"}
    # round 3 was declined by every site, each for its budget: aborted, nothing aggregated
    assert sorted(a["site"] for a in audit if a["kind"] == "budget_exhausted") == [1, 2, 3]
    last_round = [a for a in audit if a["kind"].startswith("round_")][-1]
    assert last_round["round"] == 3 and last_round["kind"] == "round_aborted"
    assert audit[-1]["kind"] == "federation_ended" and audit[-1]["status"] == "budget_exhausted"
    # each site shows its operator the privacy it spent after every round it trained
    for s in (1, 2, 3):
        spent = [float(line.split("epsilon=")[1].split(" ")[0]) for line in
                 (fed.root / "logs" / f"site-{s}.log").read_text().splitlines() if "privacy spent: epsilon=" in line]
        assert len(spent) == 2 and spent[0] < spent[1] <= 4.0 * 1.01, spent
    assert (fed.root / "checkpoint.npz").exists()


def _dp_site(tmp_path, weight_decay):
    from asagiri.config import FederationConfig, RunSpec, SiteConfig
    from asagiri.site.worker import SiteWorker
    from asagiri.wire.crypto import Identity
    from asagiri.wire.messages import Welcome

    key = Identity.generate()
    tmp_path.mkdir(parents=True)
    key.save(tmp_path / "k.key")
    cfg = SiteConfig(site_id=1, identity_key=tmp_path / "k.key", state_dir=tmp_path / "state",
                     coordinator={"public_key": key.public.hex()}, peers={1: key.public.hex()})
    fed = FederationConfig.model_validate({
        "model": {"name": "small_cnn", "norm": "group", "width": 8, "groups": 4},
        # an expected batch above the data size: one DP step per round, so the decay is one exact term
        "train": {"local_epochs": 1, "batch_size": 4096, "lr": 0.5, "optimizer": "sgd", "momentum": 0.0,
                  "weight_decay": weight_decay, "augment": False},
        "data": {"dataset": "synthetic", "synthetic_samples": 64, "image_size": 28,
                 "partition": {"scheme": "iid", "alpha": 1.0, "seed": 0}},
        "dp": {"enabled": True, "noise_multiplier": 1.0},
    })
    spec = RunSpec.of(fed)
    return SiteWorker(cfg, Welcome("r", 0, 1, spec.wire()), spec)


def test_the_site_applies_weight_decay_under_dp(tmp_path):
    """train.weight_decay used to be dropped under DP-SGD. With the same batch and the same noise,
    one SGD step with decay wd must differ from one without by exactly -lr * wd * w."""
    import numpy as np

    from asagiri.wire.messages import FitIns

    deltas, start = {}, None
    for wd in (0.0, 0.25):
        site = _dp_site(tmp_path / str(wd), wd)
        state = site.model.state_dict()
        params = {k: state[k].detach().numpy().copy() for k in site.shared}
        start = params if start is None else start
        assert all(np.array_equal(params[k], start[k]) for k in params)
        torch.manual_seed(1)  # Opacus draws its noise from torch's global generator
        delta, result = site.train(FitIns(1, 1, params, {"seed": 3}))
        assert result.steps == 1
        deltas[wd] = delta
    for k, w in start.items():
        np.testing.assert_allclose(deltas[0.25][k], deltas[0.0][k] - 0.5 * 0.25 * w, atol=1e-5, err_msg=k)
    assert any(np.abs(w).max() > 0.01 for w in start.values())  # the decay term is not trivially zero


def test_a_charge_is_given_back_only_for_the_last_training_and_on_disk(tmp_path):
    """Issue 28: a round attempt aborted before the site masked its update charged the site
    anyway, so the DP recipe stopped a round short.  An update that never left is given back,
    and only the last training's charge can be (the one the site just finished or held)."""
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, delta=1e-5)
    ledger.record(1, noise_multiplier=1.0, sample_rate=0.1, steps=10)
    one_round = ledger.epsilon()
    ledger.record(2, noise_multiplier=1.0, sample_rate=0.1, steps=10)
    assert not ledger.refund(1)  # not the last training's: refused
    assert ledger.refund(2) and ledger.epsilon() == one_round
    assert PrivacyLedger(path, delta=1e-5).epsilon() == one_round  # on disk
    assert ledger.refund(1) and ledger.epsilon() == 0.0 and not ledger.refund(1)
