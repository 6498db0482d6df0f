"""A site's share held as uint8 (``compact``) trains, scores and featurises exactly as its float
form: every batch is scaled by the same operations where it trains."""

from __future__ import annotations

import copy

import pytest
import torch

from asagiri.data.loaders import as_float, load_site_data
from asagiri.models import build
from asagiri.models.registry import prepare_data
from asagiri.privacy.engine import train_dp
from asagiri.train.loop import evaluate, train_local


def both(**kwargs):
    args = dict(dataset="pneumoniamnist", path=None, site_index=1, num_sites=4, scheme="dirichlet", alpha=0.5,
                seed=0) | kwargs
    return load_site_data(compact=True, **args), load_site_data(compact=False, **args)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_compact_share_is_a_quarter_of_the_memory_and_the_same_images():
    compact, full = both()
    for split in ("train", "val", "test"):
        c, f = getattr(compact, split), getattr(full, split)
        assert c.images.dtype == torch.uint8 and f.images.dtype == torch.float32
        assert c.images.nbytes * 4 == f.images.nbytes
        assert torch.equal(as_float(c.images), f.images) and torch.equal(c.labels, f.labels)


def test_a_simulated_scanner_profile_keeps_the_float_form():
    compact, full = both(scheme="feature")  # PneumoniaMNIST has no acquisition metadata: simulated
    assert compact.train.images.dtype == torch.float32 and torch.equal(compact.train.images, full.train.images)


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp"])
def test_training_and_scoring_on_a_compact_share_are_bit_for_bit_the_same(private: bool):
    compact, full = both()
    torch.manual_seed(0)
    start = build("small_cnn", in_channels=1, num_classes=2, width=8, norm="group", groups=4)
    models = []
    for data in (compact, full):
        model = copy.deepcopy(start)
        torch.manual_seed(1)
        if private:
            train_dp(model, data.train, epochs=1, expected_batch=64, lr=0.1, optimizer="sgd", momentum=0.9,
                     noise_multiplier=1.0, max_grad_norm=1.0, augment=True)
        else:
            train_local(model, data.train, epochs=1, batch_size=64, lr=0.01, optimizer="adam", augment=True)
        models.append(model)
    assert not torch.equal(flat(models[0]), flat(start))
    assert torch.equal(flat(models[0]), flat(models[1]))
    scored = [evaluate(models[0], d.test) for d in (compact, full)]
    assert (scored[0].scores == scored[1].scores).all() and scored[0].auc == scored[1].auc


def test_scatter_features_of_a_compact_share_are_the_same():
    compact, full = both(num_sites=8)
    a, b = prepare_data("scatter_linear", compact), prepare_data("scatter_linear", full)
    assert a.val.images.dtype == torch.float32 and torch.equal(a.val.images, b.val.images)
