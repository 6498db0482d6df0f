"""What the coordinator could see, built with the product's own code, and the attack run on it.

Each scenario makes one *observation* from the bundled chest X-rays and a freshly built model
(the global model of round 1), then inverts it and scores the result against the true images:

- ``single``: one site's gradient at batch 1, without secure aggregation (the undefended case);
  ``single_dlg`` attacks it with DLG instead of inverting gradients;
- ``local_update``: one site's realistic update, ``n_k * delta_k`` after ``train_local`` at the
  site's batch size over several local steps;
- ``dp_single`` / ``dp_update``: the same through DP-SGD at the configured epsilon (``train_dp``,
  sigma planned as a site plans it);
- ``secagg_sum``: the output of secure aggregation over ``sites`` sites, each with one image,
  computed by the real state machines (quantise, mask, unmask);
- ``plain_sum``: the control: the plain float sum of the same updates, so the report separates
  what averaging does from what the cryptography does;
- ``scatter_single``: ``scatter_linear``'s gradient at batch 1: its input features in closed
  form, then the image through the fixed ScatterNet transform by optimisation.

The attacker is given the labels for multi-image observations (a strong attacker) and recovers a
single image's label with iDLG; both are reported.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import SecAggConfig
from ..data.loaders import Split
from ..models import build
from ..models.scatter import scattering
from ..privacy.engine import noise_for_target, steps_per_round, train_dp
from ..secagg.inmemory import LocalRound
from ..secagg.quantize import dequantize
from ..train.loop import train_local
from .inversion import (
    Gradient,
    dlg,
    gradient_of,
    idlg_label,
    invert_features,
    inverting_gradients,
    linear_input,
)
from .scores import ImageScores, closest_image, match_images

__all__ = ["SCENARIOS", "InversionResult", "Settings", "recorded_round", "run_scenario"]


@dataclass(frozen=True)
class Settings:
    """How big each run is; every field goes into the report."""

    norm: str = "batch"  # small_cnn's normalisation: batch or group
    width: int = 32
    images: int = 4  # images behind a multi-image observation (batch, or one per site)
    local_epochs: int = 2  # local passes over the batch for the update scenarios
    lr: float = 1e-3  # the runtime's default (Adam)
    sites: int = 4
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    rounds: int = 15  # what a site plans its sigma over
    iterations: int = 1000
    restarts: int = 2
    tv: float = 1e-2
    seed: int = 0


@dataclass
class InversionResult:
    scenario: str
    model: str
    attack: str
    observed: str
    originals: np.ndarray = field(repr=False)
    reconstructions: np.ndarray = field(repr=False)
    scores: ImageScores
    label_accuracy: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model, "attack": self.attack, "observed": self.observed,
            "ssim_mean": round(self.scores.ssim_mean, 4), "ssim_max": round(self.scores.ssim_max, 4),
            "psnr_mean": round(self.scores.psnr_mean, 2), "ssim": [round(s, 4) for s in self.scores.ssim],
            "alignment": self.scores.alignment, "label_accuracy": self.label_accuracy,
            "seconds": round(self.seconds, 1), **self.extra,
        }


BOUNDS = (-1.0, 1.0)  # the loaders scale images to [-1, 1]


def _cnn(s: Settings, data: Split) -> nn.Module:
    torch.manual_seed(s.seed)
    model = build("small_cnn", in_channels=data.images.shape[1], num_classes=2, width=s.width, norm=s.norm, groups=8)
    return model.train()


def _update(model: nn.Module, data: Split, s: Settings, *, private: bool) -> Gradient:
    """``n * (global - local)`` over the trainable parameters: the direction of the site's update
    (the attacker matches directions, so the sign and the weight n only fix the orientation)."""
    local = copy.deepcopy(model)
    n = len(data)
    if private:
        q, steps = steps_per_round(n, n, s.local_epochs)
        sigma = noise_for_target(target_epsilon=s.epsilon, delta=s.delta, sample_rate=q, steps=steps * s.rounds)
        torch.manual_seed(s.seed)
        train_dp(local, data, epochs=s.local_epochs, expected_batch=n, lr=s.lr, optimizer="adam", momentum=0.9,
                 noise_multiplier=sigma, max_grad_norm=s.max_grad_norm, augment=False, seed=s.seed)
    else:
        train_local(local, data, epochs=s.local_epochs, batch_size=n, lr=s.lr, augment=False, seed=s.seed)
    return [n * (p0.detach() - p1.detach()) for p0, p1 in
            zip(model.parameters(), local.parameters(), strict=True)]


def _secure_sum(updates: list[Gradient], s: Settings) -> Gradient:
    """The coordinator's view under secure aggregation: the sites' updates quantised, masked, summed
    and unmasked by the product's state machines; only the sum comes out."""
    shapes = [g.shape for g in updates[0]]
    flat = [torch.cat([g.reshape(-1) for g in u]).numpy().astype(np.float32) for u in updates]
    # Each observed vector is already n * delta: it enters as delta with weight 1, so the clip
    # bounds the whole update; 64 bits so quantisation is not what hides anything.
    bound = float(max(np.abs(f).max() for f in flat)) * 1.01 + 1e-12
    secagg = SecAggConfig(mode="complete", bits=64, clip=bound, max_samples_per_site=1)
    ids = list(range(1, len(updates) + 1))
    round_ = LocalRound(ids, dim=flat[0].size, secagg=secagg, min_clients=len(ids))
    server = round_.deliver({i: (f, 1) for i, f in zip(ids, flat, strict=True)})
    assert server.result is not None and set(server.result.survivors) == set(ids), server.abort_reason
    weighted, count = dequantize(server.result.total, round_.plan)
    assert count == len(ids)
    out, pos = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(torch.from_numpy(weighted[pos : pos + size].astype(np.float32)).reshape(shape))
        pos += size
    return out


def _invert_cnn(name: str, observed: str, model: nn.Module, target: Gradient, x: torch.Tensor, y: torch.Tensor,
                s: Settings, *, recover_label: bool) -> InversionResult:
    t0 = time.perf_counter()
    labels, label_accuracy = y, None
    if recover_label:
        labels = torch.tensor([idlg_label(target[-1])])
        label_accuracy = float((labels == y).float().mean())
    inv = inverting_gradients(model, target, labels, x.shape, bounds=BOUNDS, iterations=s.iterations,
                              restarts=s.restarts, tv=s.tv, seed=s.seed)
    scores = match_images(x.numpy(), inv.images.numpy(), data_range=BOUNDS[1] - BOUNDS[0])
    return InversionResult(name, f"small_cnn/{s.norm}", "inverting gradients (cosine, TV, Adam)", observed,
                           x.numpy(), inv.images.numpy(), scores, label_accuracy, time.perf_counter() - t0,
                           {"gradient_match": round(inv.match, 5)})


def _single(data: Split, s: Settings) -> InversionResult:
    model = _cnn(s, data)
    x, y = data.images[:1], data.labels[:1]
    return _invert_cnn("single", "one site's gradient, batch 1", model, gradient_of(model, x, y), x, y, s,
                       recover_label=True)


def _single_dlg(data: Split, s: Settings) -> InversionResult:
    """DLG on the same single gradient: L2 matching with L-BFGS, the label from iDLG."""
    model = _cnn(s, data)
    x, y = data.images[:1], data.labels[:1]
    target = gradient_of(model, x, y)
    t0 = time.perf_counter()
    labels = torch.tensor([idlg_label(target[-1])])
    inv = dlg(model, target, labels, x.shape, bounds=BOUNDS, iterations=max(1, s.iterations // 4),
              restarts=s.restarts, seed=s.seed)
    scores = match_images(x.numpy(), inv.images.numpy(), data_range=BOUNDS[1] - BOUNDS[0])
    return InversionResult("single_dlg", f"small_cnn/{s.norm}", "DLG (L2, L-BFGS)", "one site's gradient, batch 1",
                           x.numpy(), inv.images.numpy(), scores, float((labels == y).float().mean()),
                           time.perf_counter() - t0, {"gradient_match": round(inv.match, 6)})


def _local_update(data: Split, s: Settings) -> InversionResult:
    model = _cnn(s, data)
    batch = Split(data.images[: s.images], data.labels[: s.images])
    target = _update(model, batch, s, private=False)
    return _invert_cnn("local_update", f"one site's update: {s.images} images, {s.local_epochs} local steps",
                       model, target, batch.images, batch.labels, s, recover_label=False)


def _dp(data: Split, s: Settings, *, images: int, name: str) -> InversionResult:
    s = replace(s, norm="group")  # DP-SGD needs GroupNorm (Opacus), as the sites convert it
    model = _cnn(s, data)
    batch = Split(data.images[:images], data.labels[:images])
    target = _update(model, batch, s, private=True)
    return _invert_cnn(name, f"one site's DP-SGD update at epsilon {s.epsilon:g}: {images} image(s)",
                       model, target, batch.images, batch.labels, s, recover_label=images == 1)


def _sums(data: Split, s: Settings, *, secure: bool) -> InversionResult:
    model = _cnn(s, data)
    x, y = data.images[: s.sites], data.labels[: s.sites]
    updates = [_update(model, Split(x[i : i + 1], y[i : i + 1]), s, private=False) for i in range(s.sites)]
    target = _secure_sum(updates, s) if secure else [sum(parts) for parts in zip(*updates, strict=True)]
    name = "secagg_sum" if secure else "plain_sum"
    what = "the secure-aggregation output" if secure else "the plain sum (control, no cryptography)"
    return _invert_cnn(name, f"{what} over {s.sites} sites, one image each", model, target, x, y, s,
                       recover_label=False)


def _scatter_single(data: Split, s: Settings) -> InversionResult:
    """Closed-form features from the linear head's gradient, then the image from the features."""
    from ..models.scatter import ScatterLinear

    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    model = ScatterLinear(data.images.shape[1], 2).train()
    x, y = data.images[:1], data.labels[:1]
    h, w = x.shape[-2:]
    transform = scattering(h, w)

    def features(img: torch.Tensor) -> torch.Tensor:
        """What the linear head sees of an image: the normalised scattering coefficients."""
        return model.norm(transform(img).flatten(1, 2)).flatten(1)

    coeffs = transform(x).flatten(1, 2).detach()  # the site trains on its fixed features
    grads = gradient_of(model, coeffs, y)
    wg, bg = grads[-2], grads[-1]
    recovered = linear_input(wg, bg).reshape(1, -1)
    truth = features(x).detach()
    feature_error = float((recovered - truth).norm() / truth.norm())
    label = idlg_label(bg)
    image = invert_features(features, recovered, x.shape, bounds=BOUNDS, iterations=s.iterations, seed=s.seed)
    scores = match_images(x.numpy(), image.numpy(), data_range=BOUNDS[1] - BOUNDS[0])
    return InversionResult("scatter_single", "scatter_linear", "closed form (linear layer), then ScatterNet inversion",
                           "one site's gradient, batch 1", x.numpy(), image.numpy(), scores,
                           float(label == int(y[0])), time.perf_counter() - t0,
                           {"feature_relative_error": round(feature_error, 8)})


SCENARIOS: dict[str, Callable[[Split, Settings], InversionResult]] = {
    "single": _single,
    "single_dlg": _single_dlg,
    "local_update": _local_update,
    "dp_single": lambda d, s: _dp(d, s, images=1, name="dp_single"),
    "dp_update": lambda d, s: _dp(d, s, images=s.images, name="dp_update"),
    "secagg_sum": lambda d, s: _sums(d, s, secure=True),
    "plain_sum": lambda d, s: _sums(d, s, secure=False),
    "scatter_single": _scatter_single,
}


def run_scenario(name: str, data: Split, settings: Settings) -> InversionResult:
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return SCENARIOS[name](data, settings)


def recorded_round(run_dir: Path, rnd: int, s: Settings) -> InversionResult:
    """Scenario f: what a run's coordinator actually held in round ``rnd``: the difference of the
    global models before and after it (``keep_models``), which is the sites' weighted mean update.
    The attacker reconstructs ``s.images`` images, with the label iDLG's rule gives, and each is
    scored against the closest of every site's training images (``best match``)."""
    from ..config import load_federation
    from ..coordinator.driver import initial_params
    from ..data import load_configured_site
    from ..models import dp_norm, prepare_data
    from ..observe.recorder import model_path

    cfg = load_federation(run_dir / "config" / "fed.yaml")
    t0 = time.perf_counter()
    before = initial_params(cfg) if rnd == 1 else dict(np.load(model_path(run_dir, rnd - 1)))
    after = dict(np.load(model_path(run_dir, rnd)))
    norm, groups = cfg.model.norm, cfg.model.groups
    if cfg.dp.enabled:
        norm, groups = dp_norm(cfg.model.name, norm, groups)
    sites = [prepare_data(cfg.model.name, load_configured_site(cfg.data, path=cfg.data.path, site_index=i,
                                                               num_sites=len(cfg.sites)))
             for i in range(len(cfg.sites))]
    pool = torch.cat([d.train.images for d in sites])
    model = build(cfg.model.name, in_channels=pool.shape[1], num_classes=sites[0].num_classes,
                  width=cfg.model.width, norm=norm, groups=groups).train()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in before.items()}, strict=False)
    # The global step's direction per parameter; a parameter the sites keep (FedBN) tells nothing.
    target = [torch.from_numpy((before[name] - after[name]).astype(np.float32)).reshape(p.shape)
              if name in after else torch.zeros_like(p) for name, p in model.named_parameters()]
    label = idlg_label(target[-1])
    labels = torch.full((s.images,), label, dtype=torch.long)
    inv = inverting_gradients(model, target, labels, (s.images, *pool.shape[1:]), bounds=BOUNDS,
                              iterations=s.iterations, restarts=s.restarts, tv=s.tv, seed=s.seed)
    recon = inv.images.numpy()
    # Each reconstruction against its closest training image: the best claim an attacker could make.
    data = pool.numpy()
    matches = [closest_image(data, r, data_range=BOUNDS[1] - BOUNDS[0]) for r in recon]
    closest = [i for i, _, _ in matches]
    scores = ImageScores([s for _, s, _ in matches], [p for _, _, p in matches],
                         "best match among the sites' training images", list(range(len(recon))))
    # The control for a best-match score: the training images' mean, an "attack" that learned
    # nothing, scored the same way. A reconstruction below it shows nothing of any one image.
    _, control, _ = closest_image(data, data.mean(0), data_range=BOUNDS[1] - BOUNDS[0])
    return InversionResult(
        "recorded", f"{cfg.model.name}/{norm}", "inverting gradients (cosine, TV, Adam)",
        f"round {rnd} of run {cfg.run_id}: the aggregate over {len(pool)} training images of {len(sites)} sites",
        data[closest], recon, scores, None, time.perf_counter() - t0,
        {"gradient_match": round(inv.match, 5), "training_images": len(pool), "closest": closest,
         "control_mean_image_ssim": round(float(control), 4)})
