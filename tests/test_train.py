"""The local training loop's optimizer state carried from one round to the next."""

import torch

from asagiri.data.loaders import Split
from asagiri.models import build
from asagiri.privacy.engine import train_dp
from asagiri.train import train_local


def _data() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.rand(32, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 2, (32,), generator=g))


def test_optimizer_state_resumes_its_moments_with_the_new_learning_rate():
    model = build("small_cnn", in_channels=1, num_classes=2, width=4, norm="group", groups=2)
    first = train_local(model, _data(), epochs=1, batch_size=8, lr=1e-3, augment=False)
    state = first.optimizer_state
    assert state is not None and state["state"][0]["step"].item() == 4
    second = train_local(model, _data(), epochs=1, batch_size=8, lr=5e-4, augment=False, optimizer_state=state)
    assert second.optimizer_state["state"][0]["step"].item() == 8  # Adam's step count went on from 4
    assert second.optimizer_state["param_groups"][0]["lr"] == 5e-4  # this call's rate, not the saved one
    fresh = train_local(model, _data(), epochs=1, batch_size=8, lr=5e-4, augment=False)
    assert fresh.optimizer_state["state"][0]["step"].item() == 4


def test_dp_training_resumes_optimizer_state_too():
    """Same weights, batches and noise; only the carried momentum differs, and so do the results."""
    import copy

    model = build("small_cnn", in_channels=1, num_classes=2, width=4, norm="group", groups=2)
    kw = dict(epochs=1, expected_batch=8, lr=0.1, optimizer="sgd", momentum=0.9, noise_multiplier=1.0,
              max_grad_norm=1.0, augment=False, seed=2)
    first = train_dp(model, _data(), **{**kw, "seed": 1})
    assert "momentum_buffer" in first.optimizer_state["state"][0]
    twin = copy.deepcopy(model)
    torch.manual_seed(5)
    resumed = train_dp(model, _data(), optimizer_state=first.optimizer_state, **kw)
    torch.manual_seed(5)
    fresh = train_dp(twin, _data(), **kw)
    assert resumed.steps == fresh.steps == 4
    assert not torch.equal(model.head.weight, twin.head.weight)
