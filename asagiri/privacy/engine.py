"""DP-SGD on a site, thin over Opacus: Poisson sampling, per-sample clipping, Gaussian noise.

The guarantee (docs/privacy.md) holds only for the model, optimizer and data loader built here:
any other data source or optimizer voids it, as Opacus' own facade warns.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn

from ..splits import Split
from ..train.accel import PLAIN, Accel
from ..train.loop import DriftTerms, OnStep, loss_fn, make_optimizer, resume_optimizer, run_steps

__all__ = ["DPResult", "dp_compatible", "noise_for_target", "train_dp"]

log = logging.getLogger(__name__)


def dp_compatible(model: nn.Module) -> tuple[nn.Module, bool]:
    """Per-sample gradients cannot pass through BatchNorm: swap it for GroupNorm (Opacus' fix).

    Returns the model (fixed when needed) and whether anything changed.  Our networks use
    non-in-place activations, which avoids the known trap of ``fix`` on ResNets.
    """
    if not ModuleValidator.validate(model, strict=False):
        return model, False
    fixed = ModuleValidator.fix(model)
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ValueError(f"model cannot be made DP-compatible: {errors}")
    return fixed, True


def noise_for_target(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' solver: the smallest sigma spending ``target_epsilon`` over ``steps`` at ``sample_rate``."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp"))


@dataclass(frozen=True)
class DPResult:
    num_samples: int
    loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    optimizer_state: dict | None = None  # moments built from noisy gradients: post-processing, no privacy cost
    mean_gradient: dict[str, np.ndarray] | None = None  # SCAFFOLD's, of the noisy gradients: post-processing


def steps_per_round(n: int, expected_batch: int, epochs: int | None = None,
                    steps: int | None = None) -> tuple[float, int]:
    """(sample rate q, steps): Poisson batches of expected size ``expected_batch``, for ``steps``
    batches or as many as ``epochs`` expected passes take (one of the two)."""
    if (epochs is None) == (steps is None):
        raise ValueError("train for a number of epochs or a number of steps, one of the two")
    q = min(1.0, expected_batch / max(n, 1))
    return q, steps if steps is not None else max(1, int(math.ceil(epochs / q)))


def train_dp(
    model: nn.Module,
    data: Split,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    expected_batch: int,
    lr: float,
    optimizer: str,
    momentum: float,
    noise_multiplier: float,
    max_grad_norm: float,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    anchor: Mapping[str, torch.Tensor] | None = None,
    correction: Mapping[str, torch.Tensor] | None = None,
    augment: bool = True,
    multiplicity: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    task: str = "binary",
    optimizer_state: dict | None = None,
    on_step: OnStep | None = None,
    accel: Accel = PLAIN,
) -> DPResult:
    """One round of DP-SGD in place on ``model`` (GroupNorm-only), through the one training loop
    (``train.loop.run_steps``) with a private step: ``steps`` Poisson batches, or as many as
    ``epochs`` expected passes take (one of the two).

    FedProx's gradient ``mu*(w - w_global)``, over the parameters named in ``anchor`` only, and
    SCAFFOLD's ``correction`` (``train.loop.DriftTerms``, the same terms as ``train_local``'s)
    are added to the private gradient after Opacus' clipping, noise and averaging, and weight
    decay inside the optimizer after that: all post-processing of a DP output, so they cost no
    privacy; so is SCAFFOLD's mean gradient, summed from the noisy gradients.

    ``multiplicity`` K > 1 is augmentation multiplicity (De et al. 2022): each sampled example is
    augmented K times and its K per-example gradients are averaged *before* clipping, so it still
    contributes one clipped gradient (the sensitivity, and so epsilon, are unchanged) with less
    augmentation variance.  It costs K times the compute.

    ``accel.ghost_clipping`` clips with Opacus' ghost clipping (Li et al. 2022; Bu et al. 2023):
    two backward passes, the first for each example's gradient norm, the second for the clipped
    sum, so per-example gradients are never all held at once (layers without a norm rule have
    theirs computed and dropped one layer at a time).  The clipped sum, and so the guarantee, is
    the same.  With ``multiplicity`` > 1 it falls back to per-example gradients ("hooks"), which
    the averaging of copies needs.
    """
    if multiplicity < 1:
        raise ValueError("multiplicity must be at least 1")
    if accel.amp is not None or accel.channels_last or accel.compile:
        # Accel.resolve never builds one for DP: these would void the clipping bound (train/accel.py).
        raise ValueError(f"DP-SGD runs in float32, channels-first and uncompiled, not with {accel.describe()}")
    n = len(data)
    q, steps = steps_per_round(n, expected_batch, epochs, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    terms = DriftTerms(model, mu, anchor, correction)  # by the plain model's names, before Opacus wraps it
    opt = make_optimizer(params, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    resume_optimizer(opt, optimizer_state)
    dataset = torch.utils.data.TensorDataset(data.images, data.labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(1, int(round(q * n))))
    multiplicity = multiplicity if augment else 1
    ghost = accel.ghost_clipping and multiplicity == 1
    criterion = _Criterion(task)
    accel.prepare(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure_mode off: said once in the site log instead
        engine = PrivacyEngine(accountant="rdp")
        wrapped = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True, criterion=criterion,
            grad_sample_mode="ghost" if ghost else "hooks",
        )
    if ghost:
        dp_model, dp_opt, criterion, dp_loader = wrapped
    else:
        dp_model, dp_opt, dp_loader = wrapped
    dp_model.train()
    private = _PrivateSteps(dp_model, dp_opt, dp_loader, criterion, steps=steps, terms=terms,
                            multiplicity=multiplicity)
    with warnings.catch_warnings():
        # Opacus' hooks fire on our first layer, whose input needs no gradient: expected, harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        total, _ = run_steps(private, augment=augment, gen=torch.Generator().manual_seed(seed), device=device,
                             on_step=on_step, accel=accel)
    # make_private wraps in place; unwrap so the plain model (and its state_dict keys) carry on.
    dp_model._close()
    return DPResult(num_samples=n, loss=total / max(private.taken, 1), steps=private.taken, sample_rate=q,
                    noise_multiplier=noise_multiplier, optimizer_state=opt.state_dict(),
                    mean_gradient=terms.mean_gradient())


class _PrivateSteps:
    """Poisson batches for a fixed number of steps; per-sample clipping and noise (Opacus)."""

    def __init__(self, dp_model, dp_opt, dp_loader, criterion, *, steps, terms,  # type: ignore[no-untyped-def]
                 multiplicity) -> None:
        self.dp_model, self.dp_opt, self.dp_loader = dp_model, dp_opt, dp_loader
        self.criterion = criterion  # ours, or Opacus' two-pass wrapper of it under ghost clipping
        self.steps, self.terms = steps, terms
        self.multiplicity = multiplicity
        self.taken = 0  # sampled batches, empty ones included: what the accountant counts

    def batches(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.taken < self.steps:
            for x, y in self.dp_loader:
                if self.taken >= self.steps:
                    break
                self.taken += 1
                if len(y) == 0:
                    # An empty Poisson batch: release nothing. The ledger still counts the step, which
                    # only overstates epsilon (conservative), never understates it.
                    continue
                k = self.multiplicity
                yield (x.repeat_interleave(k, dim=0), y.repeat_interleave(k, dim=0)) if k > 1 else (x, y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.dp_opt.zero_grad(set_to_none=True)
        loss = self.criterion(self.dp_model(x), y)
        loss.backward()
        if self.multiplicity > 1:
            _average_copies(self.dp_model, len(y) // self.multiplicity, self.multiplicity)
        # DPOptimizer.step() is pre_step() (clip, noise, divide by the expected batch) and then the
        # wrapped optimizer's step; the data-free terms go in between.
        if self.dp_opt.pre_step():
            self.terms.add_gradient()
            self.dp_opt.original_optimizer.step()
        return float(loss.item())


class _Criterion(nn.Module):
    """``train.loop.loss_fn`` as the loss module Opacus' ghost clipping asks for: with
    ``reduction="none"`` one loss per example (a multi-label example's is its mean over labels),
    whose mean is exactly the loss the site trains on."""

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task, self.reduction = task, "mean"

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_example = loss_fn(logits, y, self.task, reduction="none")
        if per_example.dim() > 1:
            per_example = per_example.mean(dim=tuple(range(1, per_example.dim())))
        return per_example if self.reduction == "none" else per_example.mean()


def _average_copies(dp_model: nn.Module, batch: int, k: int) -> None:
    """Per-example gradients of K augmented copies (rows ``i*K .. i*K+K-1``) -> their mean, per example."""
    for p in dp_model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if gs.shape[0] != batch * k:
            raise RuntimeError(f"per-example gradients for {gs.shape[0]} rows, expected {batch} x {k}")
        p.grad_sample = gs.reshape(batch, k, *gs.shape[1:]).mean(dim=1)
