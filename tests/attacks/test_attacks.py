"""The attack harness is strong where it should be and each defence lowers what it gets; on a tiny
model and a few images, so it runs in seconds."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from asagiri.attacks.inversion import gradient_of, idlg_label, inverting_gradients, linear_input
from asagiri.attacks.membership import loss_threshold
from asagiri.attacks.scores import match_images, membership_scores
from asagiri.data import load_site_data
from asagiri.data.loaders import Split


@pytest.fixture(scope="module")
def xrays():
    return load_site_data(dataset="pneumoniamnist", path=None, site_index=0, num_sites=4, scheme="iid", alpha=1.0,
                          seed=0).test


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.Sigmoid(), nn.Linear(32, 2))


def invert(model, target, x, y, iterations=300):
    inv = inverting_gradients(model, target, y, x.shape, bounds=(-1.0, 1.0), iterations=iterations, restarts=1,
                              tv=1e-3, seed=0)
    return match_images(x.numpy(), inv.images.numpy(), data_range=2.0)


def test_a_single_gradient_is_rebuilt_and_each_defence_lowers_it(xrays):
    model = mlp()
    x, y = xrays.images[:4], xrays.labels[:4]
    single = invert(model, gradient_of(model, x[:1], y[:1]), x[:1], y[:1])
    assert single.ssim_mean > 0.9  # what the implementation reaches on an undefended gradient
    # the sum over 4 images: what aggregation leaves an attacker
    summed = invert(model, gradient_of(model, x, y), x, y)
    assert summed.ssim_mean < single.ssim_mean - 0.3
    # DP-SGD's clipped, noised gradient (sigma 1 at clip 1, one example)
    gen = torch.Generator().manual_seed(0)
    clean = gradient_of(model, x[:1], y[:1])
    norm = torch.sqrt(sum((g * g).sum() for g in clean))
    noisy = [g / max(1.0, float(norm)) + torch.randn(g.shape, generator=gen) for g in clean]
    private = invert(model, noisy, x[:1], y[:1])
    assert private.ssim_mean < single.ssim_mean - 0.5


def test_idlg_recovers_every_label_of_single_gradients(xrays):
    from asagiri.models import build

    torch.manual_seed(0)
    cnn = build("small_cnn", in_channels=1, num_classes=2, width=4, norm="group", groups=2)
    for i in range(16):
        x, y = xrays.images[i : i + 1], xrays.labels[i : i + 1]
        for model in (mlp(), cnn):
            assert idlg_label(gradient_of(model, x, y)[-1]) == int(y[0])


def test_a_linear_layer_gives_its_input_in_closed_form(xrays):
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))
    x, y = xrays.images[:1], xrays.labels[:1]
    wg, bg = gradient_of(model, x, y)
    np.testing.assert_allclose(linear_input(wg, bg).numpy(), x.reshape(-1).numpy(), atol=1e-5)


def test_membership_is_chance_for_a_model_that_never_saw_the_members_and_high_for_an_overfit_one(xrays):
    gen = torch.Generator().manual_seed(0)
    members = Split(xrays.images[:40], torch.randint(0, 2, (40,), generator=gen))  # random labels: memorised
    others = Split(xrays.images[40:80], torch.randint(0, 2, (40,), generator=gen))
    fresh = mlp(seed=1)
    baseline = membership_scores(loss_threshold(fresh, members, "binary"), loss_threshold(fresh, others, "binary"))
    assert 0.3 < baseline["mia_auc"] < 0.7
    model = mlp(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(1000):
        opt.zero_grad()
        nn.functional.cross_entropy(model(members.images), members.labels).backward()
        opt.step()
    overfit = membership_scores(loss_threshold(model, members, "binary"), loss_threshold(model, others, "binary"))
    # half the non-members carry, by chance, the label the model predicts: AUC near 0.9, not 1
    assert overfit["mia_auc"] > 0.85 and overfit["mia_auc"] > baseline["mia_auc"] + 0.25


def test_the_secure_aggregation_output_is_exactly_the_plain_sum(xrays):
    """The coordinator's view under secure aggregation, from the real state machines, equals the
    control without cryptography: what protects the images is the sum, which the report separates."""
    from asagiri.attacks.scenarios import Settings, _secure_sum, _update
    from asagiri.models import build

    s = Settings(width=4, norm="group", local_epochs=1)
    torch.manual_seed(0)
    model = build("small_cnn", in_channels=1, num_classes=2, width=4, norm="group", groups=2)
    updates = [_update(model, Split(xrays.images[i : i + 1], xrays.labels[i : i + 1]), s, private=False) for i in range(4)]
    secure = _secure_sum(updates, s)
    plain = [sum(parts) for parts in zip(*updates, strict=True)]
    for a, b in zip(secure, plain, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-9)
    assert any(float(u[0].abs().max()) > 0 for u in updates)


def test_differencing_two_secure_sums_gives_one_sites_features_and_batches_stop_it(xrays):
    """The differencing scenarios: without participation batches the difference of two real
    secure sums is site 6's gradient, whose features come back exactly (compared with the features
    computed here from its image); under the default policy with batches the sites refuse the
    second sum, and what the batches allow gives three sites' features mixed."""
    from asagiri.attacks.scenarios import Settings, run_scenario

    s = Settings(feature_iterations=1, groups=2)
    open_ = run_scenario("differencing", xrays, s)
    batched = run_scenario("differencing_batched", xrays, s)
    assert open_.extra["feature_relative_error"] < 1e-3
    assert batched.extra["second_sum"].startswith("sites 1-5 refused (batches)")
    assert batched.extra["feature_relative_error"] > 0.1


def test_trap_weights_walked_over_rounds_isolate_one_image_and_derived_models_refuse_them(xrays):
    """The crafted-model scenarios (issue 27): under a policy that allows foreign models, a
    threshold walked by bisection over at most 12 secure rounds leaves one site's image alone in
    the difference of two sums, and its features come back exactly (compared with the features
    computed here from that site's image); under the default policy every site declines each
    trap, and the attacker holds nothing but its prior (the mean-image control's score)."""
    from asagiri.attacks.scenarios import CRAFTED_ROUNDS, Settings, run_scenario

    s = Settings(feature_iterations=1, groups=2)
    allowed = run_scenario("crafted_model", xrays, s)
    refused = run_scenario("crafted_model_refused", xrays, s)
    assert allowed.extra["feature_relative_error"] < 1e-3 and allowed.extra["rounds"] <= CRAFTED_ROUNDS
    assert "refused" not in allowed.extra
    assert refused.extra["refused"] == "6 FitIns declined (derive_models)" and refused.extra["rounds"] == 0
    assert refused.extra["target_site"] == allowed.extra["target_site"]  # scored against the same image
    assert refused.scores.ssim_mean == pytest.approx(refused.extra["control_mean_image_ssim"], abs=1e-4)


def test_the_report_has_every_scenario_and_target(tmp_path):
    from asagiri.attacks.scenarios import SCENARIOS
    from asagiri.cli.main import main

    out = tmp_path / "report"
    code = main(["attack", "all", "--out", str(out), "--set", "model.width=4", "--iterations", "2", "--restarts", "1",
                 "--images", "2", "--feature-iterations", "2", "--mia-model", "scatter_linear", "--mia-epochs", "1", "--references", "2",
                 "--target", "small_iid_site", "--target", "small_iid_site_dp"])
    assert code == 0
    doc = json.loads((out / "attack_report.json").read_text())
    assert set(doc["scenarios"]) == set(SCENARIOS)
    for name, r in doc["scenarios"].items():
        assert {"ssim_mean", "ssim_max", "ssim_min", "psnr_mean", "alignment", "model", "observed"} <= set(r), name
        assert (out / f"{name}.png").stat().st_size > 1000
    assert set(doc["membership"]) == {"small_iid_site", "small_iid_site_dp"}
    assert {"mia_auc", "tpr_at_1pct_fpr"} <= set(doc["membership"]["small_iid_site"]["lira_offline"])
    assert "## Membership inference" in (out / "attack_report.md").read_text()


def test_a_recorded_run_is_attacked_through_the_models_it_kept(tmp_path):
    """Scenario f: a real (in-memory) federation keeps its global models; the attack inverts the
    difference of two of them, what that coordinator held, and scores it against the training images."""
    import anyio

    from asagiri.cli.main import main
    from asagiri.local import lay_out, run_local

    run = tmp_path / "run"
    cfg, sites = lay_out(run, sites=3, rounds=2, overrides=[
        "data.dataset=synthetic", "data.synthetic_samples=96", "data.partition.scheme=iid", "model.width=4",
        "train.local_steps=5", "model.norm=group", "model.groups=2", "keep_models=true", "timeouts.heartbeat_timeout=10"])
    anyio.run(run_local, cfg, sites)
    assert (run / "models" / "round-1.npz").exists() and (run / "models" / "round-2.npz").exists()
    out = tmp_path / "attack"
    assert main(["attack", "invert", "--run", str(run), "--round", "2", "--out", str(out), "--images", "2",
                 "--iterations", "3", "--restarts", "1"]) == 0
    doc = json.loads((out / "attack_report.json").read_text())
    r = doc["scenarios"]["recorded"]
    assert r["alignment"].startswith("best match") and len(r["ssim"]) == 2 and r["training_images"] > 0
    assert 0 < r["control_mean_image_ssim"] <= 1  # the score an attack that learned nothing gets
    assert (out / "recorded.png").exists()
    assert main(["attack", "invert", "--run", str(run), "--round", "3", "--out", str(out)]) == 2  # no such round

    # Membership inference against the run's final global model, read from its checkpoint.
    mia = tmp_path / "mia"
    assert main(["attack", "mia", "--run", str(run), "--references", "2", "--out", str(mia)]) == 0
    found = json.loads((mia / "attack_report.json").read_text())["membership"]
    assert set(found) == {"global_all_sites", "global_smallest_site", "global_largest_site"}
    assert "after round 2" in found["global_all_sites"]["target"]
    for r in found.values():
        assert 0 <= r["lira_offline"]["mia_auc"] <= 1 and r["loss_threshold"]["members"] > 0

    # The attacked model is the run's final one: the digest its audit log recorded, all of it loaded,
    # and it scores the test data as the run's own evaluation did.
    from asagiri.attacks.mia import accuracy
    from asagiri.attacks.recorded import RecordedRun
    from asagiri.params import params_digest

    rec = RecordedRun.open(run)
    params = rec.global_model(None)[1]
    summary = json.loads((run / "summary.json").read_text())
    assert params_digest(params) == summary["model_sha256"]
    model = rec.model(params)
    state = model.state_dict()
    assert set(params) <= set(state)
    for name, value in params.items():
        np.testing.assert_array_equal(state[name].numpy(), value)
    tests = Split(torch.cat([d.test.images for d in rec.sites]), torch.cat([d.test.labels for d in rec.sites]))
    assert len(tests) == summary["test_examples"]
    assert accuracy(model, tests) == pytest.approx(summary["test_accuracy"], abs=1e-4)
