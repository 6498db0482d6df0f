"""Gradient inversion: what an observer of an update can rebuild of the images behind it.

Pure functions of a model, an observed gradient (or update) and a prior; no I/O.  The attacks:

- **iDLG** (Zhao et al. 2020): the label of a single sample from the last layer's gradient.  For
  softmax cross-entropy, the bias gradient is ``p - onehot(y)``: only the true class is negative.
- **DLG** (Zhu et al. 2019): find an input whose gradient is closest in L2, with L-BFGS.
- **Inverting gradients** (Geiping et al. 2020): maximise the cosine similarity of the gradients,
  with a total-variation prior, Adam on signed gradients, a step-decayed learning rate, several
  restarts; the restart whose gradient matches best is kept (the attacker cannot see the truth).
- **Linear layer, one sample** (for ``scatter_linear``): ``dL/dW = g x^T`` and ``dL/db = g``, so
  the layer's input is any row of ``dL/dW`` divided by the matching entry of ``dL/db``: closed
  form, exact.  ``invert_features`` then inverts the fixed ScatterNet transform by optimisation.

Every attack takes an explicit ``torch.Generator`` seed, so a reported figure can be rerun.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..train.loop import loss_fn

__all__ = ["Inversion", "dlg", "gradient_of", "idlg_label", "invert_features", "inverting_gradients",
           "linear_input"]

Gradient = list[torch.Tensor]


@dataclass(frozen=True)
class Inversion:
    """A reconstruction, and how well its gradient matched the observed one (lower is better)."""

    images: torch.Tensor
    labels: torch.Tensor
    match: float
    restarts: int
    iterations: int


def gradient_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str = "binary", *,
                create_graph: bool = False) -> Gradient:
    """The gradient of the mean training loss over (x, y) with respect to every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(x), y, task), params, create_graph=create_graph)
    return list(grads) if create_graph else [g.detach() for g in grads]


def idlg_label(last_bias_grad: torch.Tensor) -> int:
    """iDLG: the class whose bias gradient is negative (``p - 1 < 0``); the most negative if noise
    or an update's several steps leave more than one."""
    if last_bias_grad.dim() != 1:
        raise ValueError("expected the last layer's bias gradient, a vector over the classes")
    return int(torch.argmin(last_bias_grad))


def _cosine_distance(g: Gradient, target: Gradient) -> torch.Tensor:
    num = sum((a * b).sum() for a, b in zip(g, target, strict=True))
    den = torch.sqrt(sum((a * a).sum() for a in g)) * torch.sqrt(sum((b * b).sum() for b in target))
    return 1 - num / den.clamp_min(1e-12)


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def inverting_gradients(
    model: nn.Module, target: Gradient, labels: torch.Tensor, shape: Sequence[int], *,
    bounds: tuple[float, float], task: str = "binary", iterations: int = 2000, restarts: int = 2, lr: float = 0.1,
    tv: float = 1e-2, seed: int = 0, on_step: Callable[[int], None] | None = None,
) -> Inversion:
    """Geiping et al. 2020: images of ``shape`` (N x C x H x W) whose gradient points where
    ``target`` does, for the known or recovered ``labels``."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = bounds
    best: tuple[float, torch.Tensor] | None = None
    milestones = [int(iterations * f) for f in (0.375, 0.625, 0.875)]
    for _ in range(restarts):
        x = (torch.randn(tuple(shape), generator=gen) * (hi - lo) / 4 + (hi + lo) / 2).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        for step in range(iterations):
            opt.zero_grad()
            loss = _cosine_distance(gradient_of(model, x, labels, task, create_graph=True), target)
            (loss + tv * _total_variation(x)).backward()
            assert x.grad is not None
            x.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
            if on_step is not None:
                on_step(step)
        score = float(_cosine_distance(gradient_of(model, x.detach(), labels, task), target))
        if best is None or score < best[0]:
            best = (score, x.detach().clone())
    assert best is not None
    return Inversion(best[1], labels, best[0], restarts, iterations)


def dlg(
    model: nn.Module, target: Gradient, labels: torch.Tensor, shape: Sequence[int], *,
    bounds: tuple[float, float], task: str = "binary", iterations: int = 300, restarts: int = 2, seed: int = 0,
) -> Inversion:
    """Zhu et al. 2019: L2 gradient matching with L-BFGS (labels given, as iDLG recovers them)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = bounds
    best: tuple[float, torch.Tensor] | None = None
    for _ in range(restarts):
        x = (torch.rand(tuple(shape), generator=gen) * (hi - lo) + lo).requires_grad_(True)
        opt = torch.optim.LBFGS([x], lr=1, max_iter=iterations, history_size=100, line_search_fn="strong_wolfe")

        def closure(opt: torch.optim.LBFGS = opt, x: torch.Tensor = x) -> torch.Tensor:
            opt.zero_grad()
            g = gradient_of(model, x, labels, task, create_graph=True)
            loss = sum(((a - b) ** 2).sum() for a, b in zip(g, target, strict=True))
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            x.clamp_(lo, hi)
        g = gradient_of(model, x.detach(), labels, task)
        score = float(sum(((a - b) ** 2).sum() for a, b in zip(g, target, strict=True)))
        if best is None or score < best[0]:
            best = (score, x.detach().clone())
    assert best is not None
    return Inversion(best[1], labels, best[0], restarts, iterations)


def linear_input(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """The input of a linear layer from its gradients for one sample: ``dW[j] / db[j]``, taken at
    the class with the largest ``|db[j]|`` (the best-conditioned row)."""
    j = int(torch.argmax(bias_grad.abs()))
    if float(bias_grad[j].abs()) == 0.0:
        raise ValueError("a zero bias gradient carries no input")
    return weight_grad[j] / bias_grad[j]


def invert_features(
    transform: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, shape: Sequence[int], *,
    bounds: tuple[float, float], iterations: int = 500, lr: float = 0.05, tv: float = 1e-3, seed: int = 0,
) -> torch.Tensor:
    """An image whose (differentiable) ``transform`` is closest to ``features`` in relative L2."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = bounds
    x = (torch.rand(tuple(shape), generator=gen) * (hi - lo) + lo).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    scale = features.norm().clamp_min(1e-12)
    for _ in range(iterations):
        opt.zero_grad()
        loss = (transform(x) - features).norm() / scale + tv * _total_variation(x)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    return x.detach()
