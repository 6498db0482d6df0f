"""The local training loop: how much it trains, and the optimizer state carried from one round
to the next."""

import pytest
import torch

from asagiri.data.loaders import Split
from asagiri.models import build
from asagiri.privacy.engine import train_dp
from asagiri.train import train_local


def _data(n: int = 32) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.rand(n, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 2, (n,), generator=g))


@pytest.mark.parametrize("n", [20, 33, 400])
def test_a_fixed_step_count_is_taken_whatever_the_data_size(n):
    """Issue 26, attack 3: with ``steps`` the work of a round (and so the update's shape in time
    and magnitude) no longer grows with the site's size; with ``epochs`` it does."""
    model = build("small_cnn", in_channels=1, num_classes=2, width=4, norm="group", groups=2)
    fixed = train_local(model, _data(n), steps=7, batch_size=16, lr=1e-3, augment=False)
    assert fixed.steps == 7 and fixed.optimizer_state["state"][0]["step"].item() == 7
    by_epoch = train_local(model, _data(n), epochs=1, batch_size=16, lr=1e-3, augment=False)
    assert by_epoch.steps == -(-n // 16) - (1 if n % 16 == 1 else 0)  # a last batch of one is skipped
    private = train_dp(model, _data(n), steps=7, expected_batch=16, lr=0.1, optimizer="sgd", momentum=0.0,
                       noise_multiplier=1.0, max_grad_norm=1.0, augment=False)
    assert private.steps == 7 and private.sample_rate == min(1.0, 16 / n)


def test_steps_or_epochs_one_of_the_two():
    model = build("small_cnn", in_channels=1, num_classes=2, width=4, norm="group", groups=2)
    for both in ({}, {"epochs": 1, "steps": 3}):
        with pytest.raises(ValueError, match="one of the two"):
            train_local(model, _data(), batch_size=8, lr=1e-3, **both)


def test_batches_of_one_end_a_fixed_step_run_instead_of_spinning():
    model = build("small_cnn", in_channels=1, num_classes=2, width=4, norm="group", groups=2)
    assert train_local(model, _data(8), steps=5, batch_size=1, lr=1e-3, augment=False).steps == 0


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
