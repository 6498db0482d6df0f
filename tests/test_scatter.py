"""ScatterNet features and the linear model on them (the DP-SGD model of docs/privacy.md)."""

import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from asagiri.config import FederationConfig
from asagiri.data import load_site_data
from asagiri.data.loaders import Split
from asagiri.models import build, prepare_data, shared_keys, trains_on_features
from asagiri.models.scatter import SCATTER_CHANNELS, scatter_features
from asagiri.privacy.engine import dp_compatible, train_dp
from asagiri.train import evaluate, train_local


def test_features_have_81_channels_per_input_channel_on_a_7x7_grid():
    assert SCATTER_CHANNELS == 81  # 1 + J*L + L^2 * J(J-1)/2 with J=2, L=8
    assert scatter_features(torch.rand(5, 1, 28, 28)).shape == (5, 81, 7, 7)
    assert scatter_features(torch.rand(3, 3, 64, 64)).shape == (3, 243, 7, 7)  # pooled to the same grid
    assert scatter_features(torch.rand(0, 1, 28, 28)).shape == (0, 81, 7, 7)


def test_features_are_fixed_and_per_image():
    x = torch.rand(6, 1, 28, 28)
    a, b = scatter_features(x), scatter_features(x[3:4])
    torch.testing.assert_close(a[3:4], b)  # one image's features do not depend on the rest of its batch
    torch.testing.assert_close(a, scatter_features(x.clone()))


@pytest.mark.parametrize("shape", [(28, 28), (1, 1, 8, 8)])
def test_bad_inputs_get_a_clear_error(shape):
    with pytest.raises(ValueError, match="N x C x H x W|too small"):
        scatter_features(torch.rand(*shape))


def test_site_data_is_featurised_once_with_labels_kept():
    data = load_site_data(dataset="synthetic", path=None, site_index=0, num_sites=2, scheme="iid", alpha=1,
                          seed=0, synthetic_samples=64)
    assert trains_on_features("scatter_linear") and not trains_on_features("small_cnn")
    assert prepare_data("small_cnn", data) is data
    feats = prepare_data("scatter_linear", data)
    assert feats.train.images.shape[1:] == (81, 7, 7)
    assert torch.equal(feats.train.labels, data.train.labels) and torch.equal(feats.test.labels, data.test.labels)
    assert (feats.channels, feats.num_classes, feats.task) == (data.channels, data.num_classes, data.task)


def test_linear_model_trains_with_and_without_dp_and_needs_no_conversion():
    torch.manual_seed(0)
    # two classes that differ in texture, which the scattering coefficients separate
    smooth = torch.rand(40, 1, 1, 1).expand(40, 1, 28, 28).clone()
    rough = torch.rand(40, 1, 28, 28)
    images = torch.cat([smooth, rough]) * 2 - 1
    labels = torch.cat([torch.zeros(40), torch.ones(40)]).long()
    data = Split(scatter_features(images), labels)
    model = build("scatter_linear", in_channels=1, num_classes=2, width=32, norm="batch", groups=32)
    converted, changed = dp_compatible(model)
    assert not changed and converted is model  # no BatchNorm, nothing for Opacus to fix
    assert sum(p.numel() for p in model.parameters()) == 81 * 49 * 2 + 2 + 2 * 81
    assert set(shared_keys(model, fedbn=True)) == {"head.weight", "head.bias"}  # FedBN keeps the GroupNorm local
    assert set(shared_keys(model, fedbn=False)) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    train_local(model, data, epochs=5, batch_size=16, lr=0.01, optimizer="sgd", augment=False)
    assert evaluate(model, data).auc > 0.95
    private = build("scatter_linear", in_channels=1, num_classes=2, width=32, norm="batch", groups=32)
    r = train_dp(private, data, epochs=5, expected_batch=16, lr=0.1, optimizer="sgd", momentum=0.9,
                 noise_multiplier=0.5, max_grad_norm=0.1, augment=False)
    assert r.steps == 25 and all(torch.isfinite(p).all() for p in private.parameters())
    assert evaluate(private, data).auc > 0.9


def test_config_accepts_exactly_the_models_the_registry_builds():
    from typing import get_args

    from asagiri.config import ModelConfig
    from asagiri.models import MODEL_NAMES

    assert set(get_args(ModelConfig.model_fields["name"].annotation)) == set(MODEL_NAMES)
    for name in MODEL_NAMES:
        build(name, in_channels=1, num_classes=2, width=8, norm="group", groups=4)


def test_config_refuses_augmentation_for_a_feature_model():
    with pytest.raises(ValidationError, match="train.augment=false"):
        FederationConfig(model={"name": "scatter_linear"})
    with pytest.raises(ValidationError, match="augmentation_multiplicity=1"):
        FederationConfig(model={"name": "scatter_linear"}, train={"augment": False},
                         dp={"enabled": True, "augmentation_multiplicity": 4})
    FederationConfig(model={"name": "scatter_linear"}, train={"augment": False})


@pytest.mark.e2e
def test_dp_federation_of_the_scatter_model_over_tcp(tmp_path):
    """3 site processes featurise their data, train the linear model with DP-SGD, secure aggregation on."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.e2e.harness import Federation

    fed = Federation(tmp_path / "run", sites=3, rounds=2, overrides=[
        "data.synthetic_samples=256", "model.name=scatter_linear", "train.augment=false", "train.optimizer=sgd",
        "train.lr=0.1", "dp.enabled=true", "dp.target_epsilon=8.0", "dp.max_grad_norm=0.1", "min_clients=2",
    ], site_policy={"report_privacy": True})
    try:
        fed.start_coordinator()
        for s in (1, 2, 3):
            fed.start_site(s)
        fed.events()
        codes = fed.wait_all()
    finally:
        fed.kill_all()
    assert codes["coordinator"] == 0, fed.logs()
    records = fed.metrics()
    assert [r["round"] for r in records] == [1, 2] and all(r["secure_aggregation"] for r in records)
    assert all(0 < e <= 8.0 * 1.01 for e in records[-1]["epsilon"].values())
    assert "fixed features of" in fed.logs()
    assert fed.summary()["status"] == "completed"
