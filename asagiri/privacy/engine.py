"""DP-SGD on a site, thin over Opacus: Poisson sampling, per-sample clipping, Gaussian noise.

The guarantee (docs/privacy.md) holds only for the model, optimizer and data loader built here:
any other data source or optimizer voids it, as Opacus' own facade warns.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn

from ..data.loaders import Split
from ..train.loop import OnStep, loss_fn, make_optimizer, resume_optimizer, run_steps

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


def steps_per_round(n: int, expected_batch: int, epochs: int) -> tuple[float, int]:
    """(sample rate q, steps): Poisson batches of expected size ``expected_batch``, ``epochs`` passes."""
    q = min(1.0, expected_batch / max(n, 1))
    return q, max(1, int(math.ceil(epochs / q)))


def train_dp(
    model: nn.Module,
    data: Split,
    *,
    epochs: int,
    expected_batch: int,
    lr: float,
    optimizer: str,
    momentum: float,
    noise_multiplier: float,
    max_grad_norm: float,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    anchor: dict[str, torch.Tensor] | None = None,
    augment: bool = True,
    multiplicity: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    task: str = "binary",
    optimizer_state: dict | None = None,
    on_step: OnStep | None = None,
) -> DPResult:
    """One round of DP-SGD in place on ``model`` (GroupNorm-only), through the one training loop
    (``train.loop.run_steps``) with a private step.

    FedProx's proximal step is applied after each noisy step (``w -= lr*mu*(w - w_global)``), and
    weight decay inside the optimizer after the noise: both are post-processing of a DP output,
    so they cost no privacy.

    ``multiplicity`` K > 1 is augmentation multiplicity (De et al. 2022): each sampled example is
    augmented K times and its K per-example gradients are averaged *before* clipping, so it still
    contributes one clipped gradient (the sensitivity, and so epsilon, are unchanged) with less
    augmentation variance.  It costs K times the compute.
    """
    if multiplicity < 1:
        raise ValueError("multiplicity must be at least 1")
    n = len(data)
    q, steps = steps_per_round(n, expected_batch, epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    resume_optimizer(opt, optimizer_state)
    dataset = torch.utils.data.TensorDataset(data.images, data.labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(1, int(round(q * n))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure_mode off: said once in the site log instead
        engine = PrivacyEngine(accountant="rdp")
        dp_model, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True,
        )
    dp_model.train()
    private = _PrivateSteps(dp_model, dp_opt, dp_loader, model, steps=steps, task=task, lr=lr, mu=mu, anchor=anchor,
                            multiplicity=multiplicity if augment else 1)
    with warnings.catch_warnings():
        # Opacus' hooks fire on our first layer, whose input needs no gradient: expected, harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        total, _ = run_steps(private, augment=augment, gen=torch.Generator().manual_seed(seed), device=device,
                             on_step=on_step)
    # make_private wraps in place; unwrap so the plain model (and its state_dict keys) carry on.
    dp_model._close()
    return DPResult(num_samples=n, loss=total / max(private.taken, 1), steps=private.taken, sample_rate=q,
                    noise_multiplier=noise_multiplier, optimizer_state=opt.state_dict())


class _PrivateSteps:
    """Poisson batches for a fixed number of steps; per-sample clipping and noise (Opacus)."""

    def __init__(self, dp_model, dp_opt, dp_loader, model, *, steps, task, lr, mu, anchor,  # type: ignore[no-untyped-def]
                 multiplicity) -> None:
        self.dp_model, self.dp_opt, self.dp_loader, self.model = dp_model, dp_opt, dp_loader, model
        self.steps, self.task, self.lr, self.mu, self.anchor = steps, task, lr, mu, anchor
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
        loss = loss_fn(self.dp_model(x), y, self.task)
        loss.backward()
        if self.multiplicity > 1:
            _average_copies(self.dp_model, len(y) // self.multiplicity, self.multiplicity)
        self.dp_opt.step()
        if self.mu > 0 and self.anchor is not None:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    if name in self.anchor:
                        p.sub_(self.lr * self.mu * (p - self.anchor[name]))
        return float(loss.detach())


def _average_copies(dp_model: nn.Module, batch: int, k: int) -> None:
    """Per-example gradients of K augmented copies (rows ``i*K .. i*K+K-1``) -> their mean, per example."""
    for p in dp_model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if gs.shape[0] != batch * k:
            raise RuntimeError(f"per-example gradients for {gs.shape[0]} rows, expected {batch} x {k}")
        p.grad_sample = gs.reshape(batch, k, *gs.shape[1:]).mean(dim=1)
