"""What the coordinator could see, built with the product's own code, and the attack run on it.

Each scenario makes one *observation* from the bundled chest X-rays and a freshly built model
(the global model of round 1), then inverts it and scores the result against the true images:

- ``single``: one site's gradient at batch 1, without secure aggregation (the undefended case),
  for each of ``images`` images in turn; ``single_dlg`` attacks it with DLG instead of inverting
  gradients, and ``single_batchnorm`` with ``small_cnn``'s BatchNorm instead of GroupNorm;
- ``local_update``: one site's realistic update, ``n_k * delta_k`` after ``train_local`` at the
  site's batch size over several local steps;
- ``dp_single`` / ``dp_update``: the same through DP-SGD at the configured epsilon (``train_dp``,
  sigma planned as a site plans it over the configured rounds);
- ``secagg_sum``: the output of secure aggregation over ``sites`` sites, each with one image,
  computed by the real state machines (quantise, mask, unmask);
- ``plain_sum``: the control: the plain float sum of the same updates, so the report separates
  what averaging does from what the cryptography does;
- ``scatter_single``: ``scatter_linear``'s gradient at batch 1: its input features in closed
  form, then the image through the fixed ScatterNet transform by optimisation;
- ``differencing`` / ``differencing_batched``: six sites, one image each, two secure sums on the
  same ``scatter_linear`` model computed by the real state machines, one over every site and one
  without site 6; their difference is inverted as ``scatter_single`` inverts one gradient.
  Without participation batches (a policy that allows it) the difference is site 6's gradient;
  under the default policy, with batches [[1, 2, 3], [4, 5, 6]], the sites refuse the second
  sum, and the smallest difference the coordinator can get is a whole batch's (docs/secagg.md,
  "Participation batches").

The single-image scenarios attack ``images`` images one at a time and score each against its
own original, so the report gives the spread (mean, best and worst) over images.

The attacker is given the labels for multi-image observations (a strong attacker) and recovers a
single image's label with iDLG; both are reported.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import PolicyConfig, SecAggConfig
from ..errors import Refusal
from ..models import build
from ..models.scatter import scattering
from ..policy import SitePolicy
from ..privacy.engine import noise_for_target, steps_per_round, train_dp
from ..secagg.inmemory import LocalRound
from ..secagg.quantize import dequantize
from ..splits import Split
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
from .scores import ImageScores, match_images, score_each
from .settings import Settings

__all__ = ["BOUNDS", "SCENARIOS", "InversionResult", "Settings", "run_scenario"]


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
            "ssim_min": round(self.scores.ssim_min, 4), "psnr_mean": round(self.scores.psnr_mean, 2),
            "ssim": [round(s, 4) for s in self.scores.ssim], "psnr": [round(p, 2) for p in self.scores.psnr],
            "alignment": self.scores.alignment, "label_accuracy": self.label_accuracy,
            "seconds": round(self.seconds, 1), **self.extra,
        }


BOUNDS = (-1.0, 1.0)  # the loaders scale images to [-1, 1]
DATA_RANGE = BOUNDS[1] - BOUNDS[0]
IG = "inverting gradients (cosine, TV, Adam)"


def _cnn(s: Settings, data: Split) -> nn.Module:
    torch.manual_seed(s.seed)
    model = build("small_cnn", in_channels=data.images.shape[1], num_classes=2, width=s.width, norm=s.norm,
                  groups=s.groups)
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
        train_dp(local, data, epochs=s.local_epochs, expected_batch=n, lr=s.lr, optimizer=s.optimizer, momentum=0.9,
                 noise_multiplier=sigma, max_grad_norm=s.max_grad_norm, augment=False, seed=s.seed)
    else:
        train_local(local, data, epochs=s.local_epochs, batch_size=n, lr=s.lr, optimizer=s.optimizer, augment=False,
                    seed=s.seed)
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
    round_ = LocalRound(ids, dim=flat[0].size, secagg=secagg, min_clients=len(ids),
                        policy=partial(SitePolicy, PolicyConfig(min_participants=len(ids), min_group=2)))
    server = round_.deliver({i: (f, 1) for i, f in zip(ids, flat, strict=True)})
    assert server.result is not None and set(server.result.survivors) == set(ids), server.abort_reason
    weighted, count = dequantize(server.result.total, round_.plan)
    assert count == len(ids)
    return _unflatten(weighted, shapes)


def _unflatten(flat: np.ndarray, shapes: Sequence[torch.Size]) -> Gradient:
    """A flat vector back into float32 tensors of ``shapes``, in order."""
    out, pos = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(torch.from_numpy(flat[pos : pos + size].astype(np.float32)).reshape(shape))
        pos += size
    return out


def _prior_control(data: Split, originals: torch.Tensor) -> dict[str, float]:
    """What an attack that learned nothing scores: the mean of the images not attacked (a prior
    any attacker has), against each original.  A reconstruction should be read against it."""
    mean = data.images[len(originals) :].mean(0, keepdim=True).expand_as(originals)
    control = score_each(originals.numpy(), mean.numpy(), data_range=DATA_RANGE)
    return {"control_mean_image_ssim": round(control.ssim_mean, 4)}


def _invert(model: nn.Module, target: Gradient, labels: torch.Tensor, shape: Sequence[int], s: Settings) -> Any:
    return inverting_gradients(model, target, labels, shape, bounds=BOUNDS, iterations=s.iterations,
                               restarts=s.restarts, tv=s.tv, seed=s.seed)


# One single-image attack: (x, y) -> (reconstruction, the label the attacker recovered, figures to report).
OneImage = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int, dict[str, float]]]


def _each_image(name: str, model: str, attack: str, observed: str, data: Split, s: Settings,
                one: OneImage) -> InversionResult:
    """Attack ``s.images`` single-image observations one at a time, each against its own original."""
    t0 = time.perf_counter()
    originals, recons, labels_right = data.images[: s.images], [], []
    extra: dict[str, list[float]] = {}
    for i in range(len(originals)):
        x, y = data.images[i : i + 1], data.labels[i : i + 1]
        recon, label, figures = one(x, y)
        recons.append(recon)
        labels_right.append(label == int(y[0]))
        for key, value in figures.items():
            extra.setdefault(key, []).append(value)
    recon = torch.cat(recons).numpy()
    scores = score_each(originals.numpy(), recon, data_range=DATA_RANGE)
    return InversionResult(name, model, attack, f"{observed}, each of {len(originals)} images on its own",
                           originals.numpy(), recon, scores, float(np.mean(labels_right)), time.perf_counter() - t0,
                           {**extra, **_prior_control(data, originals)})


def _single(data: Split, s: Settings, *, name: str = "single") -> InversionResult:
    model = _cnn(s, data)

    def one(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
        target = gradient_of(model, x, y)
        label = idlg_label(target[-1])
        inv = _invert(model, target, torch.tensor([label]), x.shape, s)
        return inv.images, label, {"gradient_match": round(inv.match, 5)}

    return _each_image(name, f"small_cnn/{s.norm}", IG + "; label by iDLG", "one site's gradient at batch 1",
                       data, s, one)


def _single_dlg(data: Split, s: Settings) -> InversionResult:
    """DLG on the same single gradients: L2 matching with L-BFGS, the label from iDLG."""
    model = _cnn(s, data)

    def one(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
        target = gradient_of(model, x, y)
        label = idlg_label(target[-1])
        inv = dlg(model, target, torch.tensor([label]), x.shape, bounds=BOUNDS, iterations=max(1, s.iterations // 4),
                  restarts=s.restarts, seed=s.seed)
        return inv.images, label, {"gradient_match": round(inv.match, 6)}

    return _each_image("single_dlg", f"small_cnn/{s.norm}", "DLG (L2, L-BFGS); label by iDLG",
                       "one site's gradient at batch 1", data, s, one)


def _dp_single(data: Split, s: Settings) -> InversionResult:
    s = replace(s, norm="group")  # DP-SGD needs GroupNorm (Opacus), as the sites convert it
    model = _cnn(s, data)

    def one(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
        target = _update(model, Split(x, y), s, private=True)
        label = idlg_label(target[-1])
        inv = _invert(model, target, torch.tensor([label]), x.shape, s)
        return inv.images, label, {"gradient_match": round(inv.match, 5)}

    return _each_image("dp_single", f"small_cnn/{s.norm}", IG + "; label by iDLG",
                       f"one site's DP-SGD update at epsilon {s.epsilon:g} on one image", data, s, one)


def _batch(name: str, observed: str, model: nn.Module, target: Gradient, data: Split, s: Settings,
           images: int) -> InversionResult:
    """Invert a multi-image observation; the attacker is given the labels, and its reconstructions
    are paired with the originals by the best permutation."""
    t0 = time.perf_counter()
    batch = Split(data.images[:images], data.labels[:images])
    inv = _invert(model, target, batch.labels, batch.images.shape, s)
    scores = match_images(batch.images.numpy(), inv.images.numpy(), data_range=DATA_RANGE)
    return InversionResult(name, f"small_cnn/{s.norm}", IG + "; labels given", observed, batch.images.numpy(),
                           inv.images.numpy(), scores, None, time.perf_counter() - t0,
                           {"gradient_match": round(inv.match, 5), **_prior_control(data, batch.images)})


def _local_update(data: Split, s: Settings) -> InversionResult:
    model = _cnn(s, data)
    batch = Split(data.images[: s.images], data.labels[: s.images])
    target = _update(model, batch, s, private=False)
    return _batch("local_update", f"one site's update: {s.images} images, {s.local_epochs} local steps",
                  model, target, data, s, s.images)


def _dp_update(data: Split, s: Settings) -> InversionResult:
    s = replace(s, norm="group")
    model = _cnn(s, data)
    batch = Split(data.images[: s.images], data.labels[: s.images])
    target = _update(model, batch, s, private=True)
    return _batch("dp_update", f"one site's DP-SGD update at epsilon {s.epsilon:g}: {s.images} images, "
                  f"{s.local_epochs} local steps", model, target, data, s, s.images)


def _sums(data: Split, s: Settings, *, secure: bool) -> InversionResult:
    model = _cnn(s, data)
    batch = Split(data.images[: s.sites], data.labels[: s.sites])
    updates = [_update(model, Split(batch.images[i : i + 1], batch.labels[i : i + 1]), s, private=False)
               for i in range(s.sites)]
    target = _secure_sum(updates, s) if secure else [sum(parts) for parts in zip(*updates, strict=True)]
    name = "secagg_sum" if secure else "plain_sum"
    what = "the secure-aggregation output" if secure else "the plain sum (control, no cryptography)"
    return _batch(name, f"{what} over {s.sites} sites, one image each", model, target, data, s, s.sites)


def _scatter_model(data: Split, s: Settings) -> tuple[nn.Module, Callable, Callable[[torch.Tensor], torch.Tensor]]:
    """``scatter_linear`` as built for round 1, its fixed ScatterNet transform, and ``features``:
    what the linear head sees of an image (the normalised scattering coefficients)."""
    from ..models.scatter import ScatterLinear

    torch.manual_seed(s.seed)
    model = ScatterLinear(data.images.shape[1], 2, groups=s.groups).train()
    transform = scattering(*data.images.shape[-2:])

    def features(img: torch.Tensor) -> torch.Tensor:
        return model.norm(transform(img).flatten(1, 2)).flatten(1)

    return model, transform, features


def _scatter_single(data: Split, s: Settings) -> InversionResult:
    """Closed-form features from the linear head's gradient, then the image from the features."""
    model, transform, features = _scatter_model(data, s)

    def one(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
        coeffs = transform(x).flatten(1, 2).detach()  # the site trains on its fixed features
        grads = gradient_of(model, coeffs, y)
        recovered = linear_input(grads[-2], grads[-1]).reshape(1, -1)
        truth = features(x).detach()
        image = invert_features(features, recovered, x.shape, bounds=BOUNDS, iterations=s.feature_iterations,
                                seed=s.seed)
        return image, idlg_label(grads[-1]), {
            "feature_relative_error": round(float((recovered - truth).norm() / truth.norm()), 8)}

    return _each_image("scatter_single", "scatter_linear", "closed form (linear layer), then ScatterNet inversion",
                       "one site's gradient at batch 1", data, s, one)


DIFFERENCING_BATCHES = [[1, 2, 3], [4, 5, 6]]


def _sum_over(flat: dict[int, np.ndarray], participants: list[int], batches: list[list[int]] | None,
              ) -> tuple[np.ndarray | None, dict[int, str]]:
    """One secure sum over ``participants`` by the real machines, as the sites' default policy
    sees it (``min_participants`` 3); None and the refusals where the sites refused it."""
    bound = float(max(np.abs(f).max() for f in flat.values())) * 1.01 + 1e-12
    secagg = SecAggConfig(mode="complete", bits=64, clip=bound, max_samples_per_site=1, batches=batches)
    round_ = LocalRound(participants, dim=next(iter(flat.values())).size, secagg=secagg, min_clients=3,
                        policy=partial(SitePolicy, PolicyConfig(min_group=2)))
    server = round_.deliver({i: (flat[i], 1) for i in participants})
    if server.result is None:
        return None, round_.refusals
    return dequantize(server.result.total, round_.plan)[0], {}


def _differencing(data: Split, s: Settings, *, batched: bool) -> InversionResult:
    t0 = time.perf_counter()
    model, transform, features = _scatter_model(data, s)
    sites = list(range(1, 7))
    grads = {u: gradient_of(model, transform(data.images[u - 1 : u]).flatten(1, 2).detach(), data.labels[u - 1 : u])
             for u in sites}
    flat = {u: torch.cat([g.reshape(-1) for g in gs]).numpy().astype(np.float32) for u, gs in grads.items()}
    batches = DIFFERENCING_BATCHES if batched else None
    everyone, _ = _sum_over(flat, sites, batches)
    assert everyone is not None
    without, refusals = _sum_over(flat, sites[:-1], batches)
    extra: dict[str, Any] = {"second_sum": "sites 1-5"}
    if without is None:  # refused: the smallest difference the batches allow
        extra = {"second_sum": "sites 1-5 refused (" + ", ".join(sorted({r.split(":")[0] for r in refusals.values()}))
                 + "); sites 1-3 instead"}
        without, _ = _sum_over(flat, [1, 2, 3], batches)
        assert without is not None
    parts = _unflatten(everyone - without, [g.shape for g in grads[6]])
    recovered = linear_input(parts[-2], parts[-1]).reshape(1, -1)
    x = data.images[5:6]
    truth = features(x).detach()
    extra["feature_relative_error"] = round(float((recovered - truth).norm() / truth.norm()), 6)

    image = invert_features(features, recovered, x.shape, bounds=BOUNDS, iterations=s.feature_iterations, seed=s.seed)
    scores = score_each(x.numpy(), image.detach().numpy(), data_range=DATA_RANGE)
    mean = data.images[6:].mean(0, keepdim=True)
    control = score_each(x.numpy(), mean.numpy(), data_range=DATA_RANGE)
    name = "differencing_batched" if batched else "differencing"
    policy = "the default policy, batches [[1, 2, 3], [4, 5, 6]]" if batched else "no batches (a policy that allows it)"
    return InversionResult(name, "scatter_linear", "two secure sums subtracted; closed form, then ScatterNet inversion",
                           f"all six sites' secure sum minus a second one on the same model, under {policy}; "
                           "scored against site 6's image", x.numpy(), image.detach().numpy(), scores, None,
                           time.perf_counter() - t0, {**extra, "control_mean_image_ssim": round(control.ssim_mean, 4)})


def _trap(model: nn.Module, direction: torch.Tensor, threshold: float, scale: float) -> nn.Module:
    """``model`` with a crafted head: class 1's logit is ``scale * (a.f - t)``, class 0's zero.  An
    image whose projection ``a.f`` lies above ``t`` is classed 1 with certainty, below it 0, so its
    gradient on the head is ``-f`` or zero, by which side of ``t`` it lies (either label)."""
    trap = copy.deepcopy(model)
    with torch.no_grad():
        trap.head.weight.zero_()
        trap.head.bias.zero_()
        trap.head.weight[1] = scale * direction
        trap.head.bias[1] = -scale * threshold
    return trap


CRAFTED_ROUNDS = 12  # the walk: one secure round per threshold


class _Refused(Exception):
    """The sites declined the trap: the coordinator holds no sum of it."""


def _bisect(between: Callable[[float, float], int]) -> tuple[float, float] | None:
    """Two thresholds with exactly one image's projection between them, by bisection from
    ``(-4, 4]`` (GroupNorm gives each feature group unit variance: a unit projection rarely leaves
    it), each new threshold one more round; None if the rounds run out first."""
    lo, hi, thresholds = -4.0, 4.0, 2
    while thresholds <= CRAFTED_ROUNDS:
        if between(lo, hi) == 1:
            return lo, hi
        mid = (lo + hi) / 2
        thresholds += 1
        lo, hi = (lo, mid) if between(lo, mid) >= 1 else (mid, hi)
    return None


def _crafted(data: Split, s: Settings, *, allowed: bool) -> InversionResult:
    """Trap weights walked over rounds (issue 27; Fowl et al. 2022, "Robbing the Fed"; Boenisch et
    al. 2023): each round the coordinator sends six sites a ``scatter_linear`` whose head holds a
    threshold on one projection of the features, and takes the round's secure sum (the real
    machines).  The difference of two rounds' sums holds exactly the images whose projection lies
    between the two thresholds; bisection finds two thresholds with one image between, whose
    features the difference gives in closed form.  Under a policy that allows foreign models the
    sites train on each trap; under the default (``derive_models``) every site declines a model
    it did not derive, and the coordinator holds no sum of any trap."""
    from ..secagg.binding import params_digest

    t0 = time.perf_counter()
    model, transform, features = _scatter_model(data, s)
    sites = list(range(1, 7))
    coeffs = {u: transform(data.images[u - 1 : u]).flatten(1, 2).detach() for u in sites}
    gen = torch.Generator().manual_seed(s.seed)
    width = model.head.weight.shape[1]
    direction = torch.randn(width, generator=gen)
    direction /= direction.norm()
    scale = 1e4
    derived = {k: v.detach().numpy() for k, v in model.state_dict().items()}  # the model the sites derived
    sums: dict[float, list[torch.Tensor]] = {}
    refusals: list[str] = []

    def secure_round(threshold: float) -> list[torch.Tensor] | None:
        trap = _trap(model, direction, threshold, scale)
        sent = {k: v.detach().numpy() for k, v in trap.state_dict().items()}
        if not allowed:  # each site's policy, as its machine checks every FitIns (SPEC §6.9)
            policy = SitePolicy(PolicyConfig())
            for _ in sites:
                try:
                    policy.check_derived("FitIns", params_digest(sent), [params_digest(derived)], 0)
                except Refusal as exc:
                    refusals.append(str(exc.rule))
            return None
        grads = {u: gradient_of(trap, coeffs[u], data.labels[u - 1 : u]) for u in sites}
        flat = {u: torch.cat([g.reshape(-1) for g in gs]).numpy().astype(np.float32) for u, gs in grads.items()}
        total, _ = _sum_over(flat, sites, None)
        assert total is not None
        return _unflatten(total, [g.shape for g in grads[1]])

    def between(lo: float, hi: float) -> int:
        """Images whose projection lies in (lo, hi]: each adds -1 to the head's class-1 bias
        gradient at ``hi`` and nothing at ``lo``, whatever its label."""
        for t in (lo, hi):
            if t not in sums:
                got = secure_round(t)
                if got is None:
                    raise _Refused
                sums[t] = got
        return round(-float(sums[hi][-1][1] - sums[lo][-1][1]))

    projections = {u: float(direction @ features(data.images[u - 1 : u]).detach().reshape(-1)) for u in sites}
    mean = data.images[6:].mean(0, keepdim=True)
    extra: dict[str, Any] = {}
    try:
        interval = _bisect(between)
    except _Refused:
        # the attacker holds no sum of any trap, only its prior; scored against the image the same
        # walk isolates when the sites allow it (found here from the true projections)
        interval = _bisect(lambda lo, hi: sum(lo < p <= hi for p in projections.values()))
        extra["refused"] = f"{len(refusals)} FitIns declined ({', '.join(sorted(set(refusals)))})"
    extra["rounds"] = len(sums)
    if interval is None:
        raise RuntimeError(f"no threshold pair isolates one image within {CRAFTED_ROUNDS} rounds")
    target = next(u for u, p in projections.items() if interval[0] < p <= interval[1])
    x = data.images[target - 1 : target]
    if "refused" in extra:
        image = mean
    else:
        diff = [a - b for a, b in zip(sums[interval[1]], sums[interval[0]], strict=True)]
        recovered = linear_input(diff[-2], diff[-1]).reshape(1, -1)
        truth = features(x).detach()
        extra["feature_relative_error"] = round(float((recovered - truth).norm() / truth.norm()), 6)
        extra["interval"] = [round(v, 6) for v in interval]
        image = invert_features(features, recovered, x.shape, bounds=BOUNDS, iterations=s.feature_iterations,
                                seed=s.seed).detach()
    scores = score_each(x.numpy(), image.numpy(), data_range=DATA_RANGE)
    control = score_each(x.numpy(), mean.numpy(), data_range=DATA_RANGE)
    name = "crafted_model" if allowed else "crafted_model_refused"
    policy = "a policy that allows foreign models (derive_models: false)" if allowed else \
        "the default policy (derive_models)"
    return InversionResult(name, "scatter_linear", "trap weights walked by bisection; closed form, then ScatterNet "
                           "inversion", f"secure sums of six sites over {extra['rounds']} rounds of crafted models, under "
                           f"{policy}; scored against site {target}'s image, the one the walk isolates", x.numpy(), image.numpy(), scores,
                           None, time.perf_counter() - t0,
                           {**extra, "target_site": target, "control_mean_image_ssim": round(control.ssim_mean, 4)})


SCENARIOS: dict[str, Callable[[Split, Settings], InversionResult]] = {
    "single": _single,
    "single_dlg": _single_dlg,
    "single_batchnorm": lambda d, s: _single(d, replace(s, norm="batch"), name="single_batchnorm"),
    "local_update": _local_update,
    "dp_single": _dp_single,
    "dp_update": _dp_update,
    "secagg_sum": lambda d, s: _sums(d, s, secure=True),
    "plain_sum": lambda d, s: _sums(d, s, secure=False),
    "scatter_single": _scatter_single,
    "differencing": lambda d, s: _differencing(d, s, batched=False),
    "differencing_batched": lambda d, s: _differencing(d, s, batched=True),
    "crafted_model": lambda d, s: _crafted(d, s, allowed=True),
    "crafted_model_refused": lambda d, s: _crafted(d, s, allowed=False),
}


def run_scenario(name: str, data: Split, settings: Settings) -> InversionResult:
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return SCENARIOS[name](data, settings)
