"""DP that can be shown: the noise DP-SGD adds is there and of the size the accountant assumes,
each example's gradient is clipped on its own, and FedProx means the same with DP as without.

Everything runs the product's own path (``privacy.engine.train_dp``, which the sites call) on
tiny models and synthetic inputs, from fixed seeds; nothing of Opacus is stubbed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from scipy import stats

from asagiri.models import MODEL_NAMES, build, shared_keys
from asagiri.privacy.engine import train_dp
from asagiri.splits import Split
from asagiri.train.loop import loss_fn, train_local

BATCH = 8  # examples in the split; with expected_batch = BATCH the sample rate is 1 (see _step)
RUNS = 8  # DP-SGD steps from the same start, for the noise's variance
TOLERANCE = 0.10  # relative, on the noise variance
MAX_FAILURE = 1e-6  # the chance a correct product fails the noise test, per model

# Each model the product ships, tiny: (build arguments, one input's shape).  scatter_linear takes
# ScatterNet features (81 channels of 7 x 7 per image channel), which it computes once per site.
MODELS = {
    "small_cnn": (dict(width=4, norm="group", groups=2), (1, 16, 16)),
    "resnet18": (dict(width=2, norm="group", groups=2), (1, 16, 16)),
    "scatter_linear": (dict(width=4, norm="group", groups=27), (81, 7, 7)),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small run fastest on one thread; two threads on a busy two-core machine run
    the resnet's steps ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_shipped_model_is_covered():
    assert set(MODELS) == set(MODEL_NAMES)


def _model_and_data(name: str) -> tuple[torch.nn.Module, Split]:
    kw, shape = MODELS[name]
    torch.manual_seed(0)
    model = build(name, in_channels=1, num_classes=2, **kw)
    g = torch.Generator().manual_seed(1)
    return model, Split(torch.randn(BATCH, *shape, generator=g), torch.randint(0, 2, (BATCH,), generator=g))


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def _step(start: torch.nn.Module, data: Split, *, sigma: float, clip: float, lr: float, seed: int) -> torch.Tensor:
    """One DP-SGD step of ``train_dp`` from a copy of ``start``: the update ``w_after - w_before``.

    Plain SGD (no momentum, no weight decay, no FedProx), so the update is ``-lr`` times the
    private gradient.  expected_batch = len(data) makes the Poisson sample rate 1: every example
    is in the one batch of every run (``torch.rand(n) < 1.0``), so the runs differ only in noise.
    """
    model = copy.deepcopy(start)
    before = _flat(model)
    torch.manual_seed(seed)  # Opacus draws its noise from torch's global generator (secure_mode off)
    r = train_dp(model, data, epochs=1, expected_batch=len(data), lr=lr, optimizer="sgd", momentum=0.0,
                 noise_multiplier=sigma, max_grad_norm=clip, augment=False)
    assert (r.sample_rate, r.steps, r.noise_multiplier) == (1.0, 1, sigma)
    return _flat(model) - before


def _per_example_gradients(start: torch.nn.Module, data: Split) -> torch.Tensor:
    """Each example's gradient of its own loss, by plain autograd, one example at a time (N x d)."""
    model = copy.deepcopy(start).train()
    rows = []
    for i in range(len(data)):
        model.zero_grad(set_to_none=True)
        loss_fn(model(data.images[i : i + 1]), data.labels[i : i + 1], "binary").backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_noise_is_there_and_of_the_size_the_accountant_assumes(name):
    """Opacus adds N(0, sigma^2 C^2) to each coordinate of the *sum* of the clipped per-example
    gradients, then divides by the expected batch size B (``DPOptimizer.add_noise``,
    ``scale_grad``); an SGD step at rate lr makes that an update whose noise has, per
    coordinate, standard deviation s = lr * sigma * C / B.

    Runs from the same start on the same batch (sample rate 1) share the clipped gradient, so
    their updates differ by noise alone, independent across runs and coordinates.  With k runs
    of d coordinates, the pooled sample variance V = sum_j sum_i (u_ij - mean_j)^2 / (d(k-1))
    satisfies d(k-1) V / s^2 ~ chi-square with d(k-1) degrees of freedom, exactly, so
    V / s^2 has mean 1 and relative sd sqrt(2 / (d(k-1))) (0.013 for small_cnn's 1566
    coordinates over 8 runs; 0.0050 and 0.0059 for the resnet's 11328 and scatter_linear's
    8102).  The test accepts V / s^2 in [1 - 10%, 1 + 10%]; the chance a correct product falls
    outside is computed from the chi-square law below and asserted to be under 1e-6 (it is
    4e-13 for small_cnn, 10% being 7.4 of its sds, and far smaller for the others).  No noise
    (V = 0), or sigma doubled (V / s^2 near 4), falls outside with certainty for all practical
    purposes.  sigma, C and lr are none of them 1, so a theory missing one of them fails too.

    The sample rate is 1 here, so the expected batch B is the batch: the test does not tell
    Opacus' divisor (the expected batch size, q * n) from the batch drawn, which only differ
    under Poisson sampling with q < 1.

    The mean update over the runs must be the noiseless step (sigma = 0, same clipping): with
    the mean's own noise of variance s^2 / k per coordinate, k * sum_j (mean_j - u0_j)^2 / s^2
    ~ chi-square(d), accepted between its 1e-7 and 1 - 1e-7 quantiles.
    """
    start, data = _model_and_data(name)
    sigma, clip, lr = 1.3, 0.5, 2.0  # none 1, so the test tells each factor of the theory apart
    updates = torch.stack([_step(start, data, sigma=sigma, clip=clip, lr=lr, seed=100 + i) for i in range(RUNS)])
    k, d = updates.shape
    s2 = (lr * sigma * clip / len(data)) ** 2  # the theory: expected_batch = len(data) here
    dof = d * (k - 1)
    ratio = float(((updates - updates.mean(0)) ** 2).sum()) / dof / s2
    chance = stats.chi2.cdf(dof * (1 - TOLERANCE), dof) + stats.chi2.sf(dof * (1 + TOLERANCE), dof)
    assert chance < MAX_FAILURE, f"too few coordinates x runs ({dof}) for a {TOLERANCE:.0%} test"
    assert abs(ratio - 1) <= TOLERANCE, (
        f"{name}: noise variance is {ratio:.3f} x the theory's (lr sigma C / B)^2 = {s2:.3g}, "
        f"over {d} coordinates x {k} runs")

    noiseless = _step(start, data, sigma=0.0, clip=clip, lr=lr, seed=0)
    centred = k * float(((updates.mean(0) - noiseless) ** 2).sum()) / s2
    lo, hi = stats.chi2.ppf(MAX_FAILURE / 10, d), stats.chi2.isf(MAX_FAILURE / 10, d)
    assert lo <= centred <= hi, f"{name}: the runs' mean is off the noiseless step ({centred:.0f} for chi2({d}))"


@pytest.mark.parametrize("name", list(MODELS))
def test_each_example_is_clipped_on_its_own_to_the_bound(name):
    """sigma = 0: the step is -lr times the mean over the batch of each example's gradient scaled
    to norm at most C, computed here by hand, one example at a time, with C set between the
    examples' gradient norms so some are clipped and some are not."""
    start, data = _model_and_data(name)
    grads = _per_example_gradients(start, data)
    norms = grads.norm(dim=1)
    clip = float(norms.median())
    assert (norms > 1.05 * clip).any() and (norms < 0.95 * clip).any(), norms
    lr = 0.5
    clipped = grads * (clip / norms).clamp(max=1.0).unsqueeze(1)
    want = -lr * clipped.sum(0) / len(data)
    got = _step(start, data, sigma=0.0, clip=clip, lr=lr, seed=0)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
    # and the test can tell: clipping the batch's mean once, or not at all, is another step
    mean = grads.mean(0)
    for wrong in (-lr * mean, -lr * mean * min(1.0, clip / float(mean.norm()))):
        assert float((got - wrong).abs().max()) > 100 * 1e-5 * scale


def _norm_parameters(model: torch.nn.Module) -> set[str]:
    return {k for k, _ in model.named_parameters()} - set(shared_keys(model, fedbn=True))


@pytest.mark.parametrize(("optimizer", "momentum", "weight_decay", "epochs"),
                         [("sgd", 0.0, 0.0, 1), ("sgd", 0.9, 1e-3, 2), ("adam", 0.0, 0.0, 2)])
def test_fedprox_means_the_same_with_dp_as_without(optimizer, momentum, weight_decay, epochs):
    """FedProx's term mu/2 ||w - w_global||^2 over the shared parameters only, one formula in both
    paths: plain training and DP-SGD with no noise and no clipping (C far above every gradient)
    take the same steps on the same batch, with mu > 0; under FedBN the local norm layers are not
    pulled towards anything."""
    start, data = _model_and_data("small_cnn")
    norm_keys = _norm_parameters(start)
    assert norm_keys, "small_cnn has GroupNorm weights, which FedBN keeps local"
    # The global model the site trains towards: the shared tensors only, and away from the start
    # so the proximal pull shows from the first step.
    g = torch.Generator().manual_seed(2)
    state = start.state_dict()
    anchor = {k: state[k] + 0.1 * torch.randn(state[k].shape, generator=g) for k in shared_keys(start, fedbn=True)}
    lr, mu = 0.1, 0.5
    kw = dict(epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
              anchor=anchor, augment=False, seed=3)

    def plain(mu_: float) -> torch.nn.Module:
        model = copy.deepcopy(start)
        train_local(model, data, batch_size=len(data), mu=mu_, **kw)
        return model

    def private(mu_: float) -> torch.nn.Module:
        model = copy.deepcopy(start)
        r = train_dp(model, data, expected_batch=len(data), noise_multiplier=0.0, max_grad_norm=1e6, mu=mu_, **kw)
        assert (r.sample_rate, r.steps) == (1.0, epochs)
        return model

    for mu_ in (0.0, mu):
        a, b = dict(plain(mu_).named_parameters()), dict(private(mu_).named_parameters())
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"mu={mu_}: {key}")

    pulled, free = dict(plain(mu).named_parameters()), dict(plain(0.0).named_parameters())
    first = dict(start.named_parameters())
    for key in first:
        if not (optimizer == "sgd" and momentum == 0.0 and epochs == 1):
            # (after one step the pulled shared weights change the norm layers' gradients too)
            assert key in norm_keys or not torch.allclose(pulled[key], free[key]), key
        elif key in norm_keys:  # local: the same step with mu as without
            torch.testing.assert_close(pulled[key], free[key], rtol=0, atol=1e-7, msg=key)
        else:  # one step: w - lr (g + mu (w - w_global))
            want = free[key] - lr * mu * (first[key] - anchor[key])
            torch.testing.assert_close(pulled[key], want, rtol=1e-5, atol=1e-6, msg=key)


def test_a_fedprox_anchor_must_name_the_models_tensors():
    start, data = _model_and_data("scatter_linear")
    with pytest.raises(KeyError, match="not a tensor"):
        train_local(start, data, epochs=1, batch_size=len(data), lr=0.1, optimizer="sgd", mu=0.1,
                    anchor={"no.such.weight": torch.zeros(1)}, augment=False)
