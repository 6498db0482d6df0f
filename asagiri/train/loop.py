"""Local training, with its data-free drift terms (FedProx, SCAFFOLD), and evaluation with scikit-learn metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..scores import accuracy_score, auc_score
from ..splits import Split, as_float
from .accel import PLAIN, Accel

__all__ = ["EvalResult", "Steps", "TrainResult", "accuracy_score", "auc_score", "augment_shifts", "evaluate",
           "loss_fn", "make_optimizer", "OnStep", "DriftTerms", "resume_optimizer", "run_steps", "train_local"]


@dataclass(frozen=True)
class TrainResult:
    num_samples: int
    loss: float
    steps: int
    optimizer_state: dict | None = None  # the optimizer's state_dict at the end, for the next round
    mean_gradient: dict[str, np.ndarray] | None = None  # SCAFFOLD: the round's mean gradient (DriftTerms)


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float
    auc: float | None  # None where the split holds a single class
    scores: np.ndarray
    labels: np.ndarray

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.loss, "accuracy": self.accuracy}
        if self.auc is not None:
            out["auc"] = self.auc
        else:  # said, not left out: the site would vanish from the AUC plot and the mean unexplained
            out["auc_undefined"] = 1.0
        return out


def augment_shifts(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 pixels (reflection padding), the light augmentation we use."""
    n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    # Drawn on the CPU generator and moved: the same seed shifts the same way on any device.
    dx = torch.randint(0, 5, (n,), generator=generator).to(x.device)
    dy = torch.randint(0, 5, (n,), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h) + dy.view(n, 1)
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, x.shape[1], h, w + 4))
    cols = torch.arange(w, device=x.device).view(1, w) + dx.view(n, 1)
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, x.shape[1], h, w))


class Steps(Protocol):
    """One kind of training step, plugged into :func:`run_steps` (plain here, DP-SGD in
    ``privacy/engine.py``): where the batches come from, and what one update does."""

    def batches(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float: ...


OnStep = Callable[[int], None]  # told the number of updates made so far (a progress bar)


def run_steps(steps: Steps, *, augment: bool, gen: torch.Generator, device: torch.device | str,
              on_step: OnStep | None = None, accel: Accel = PLAIN) -> tuple[float, int]:
    """The training loop, whatever the step: (summed loss, updates made).  ``gen`` drives the
    shuffling and the augmentation, in that order, so a seed reproduces a round exactly.  Batches
    are scaled to float (a compact split's) and augmented where they train (on a GPU, on the
    GPU), after the copy."""
    device = torch.device(device)
    total, done = 0.0, 0
    for x, y in steps.batches(gen):
        x, y = as_float(accel.to_device(x, device)), accel.to_device(y, device)
        if augment:
            x = augment_shifts(x, gen)
        total += steps.step(accel.layout(x), y)
        done += 1
        if on_step is not None:
            on_step(done)
    return total, done


def make_optimizer(params: list[nn.Parameter], *, optimizer: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """The one place an optimizer is built, plain or private (weight decay after the noise is
    post-processing of a DP output: it costs no privacy)."""
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class DriftTerms:
    """The data-free terms a round adds to each gradient, one meaning for plain and private
    training, just before the optimizer updates a parameter (where they meet momentum, Adam's
    moments and weight decay as any gradient does):

    - FedProx's ``mu/2 * ||w - w_global||^2`` (Li et al. 2020), whose gradient is
      ``mu * (w - w_global)``, over the parameters named in ``anchor`` (the global model's shared
      tensors) and no others, so FedBN's local norm layers are never pulled towards anything.
      ``anchor=None`` anchors every trainable parameter at its value now (right for a caller
      that has just loaded the global model and keeps no layer local).  Anchor entries that are
      buffers, not parameters, are not pulled.
    - SCAFFOLD's correction ``c - c_i`` (Karimireddy et al. 2020), a constant per parameter named
      in ``correction``.  With ``correction`` given, the gradients the terms are added to are
      also summed (:meth:`mean_gradient`): the site's next control variate is their mean over
      the round, exactly Option II's ``c_i - c + (x - y_i) / (K lr)`` for plain SGD, and on the
      gradients' own scale for Adam and momentum too.

    Under DP-SGD they are added (and the gradient summed) after Opacus' clipping, noise and
    averaging: the terms depend on no example (only on the weights and control variates, DP
    outputs of earlier steps and rounds, and the public global model), and the summed gradient is
    the noisy one the optimizer gets, so all of it is post-processing and costs no privacy;
    clipping or noising the terms would only distort them.
    """

    def __init__(self, model: nn.Module, mu: float, anchor: Mapping[str, torch.Tensor] | None,
                 correction: Mapping[str, torch.Tensor] | None = None) -> None:
        self.mu = float(mu)
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.shifts: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.tracked: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}  # name -> (parameter, gradient sum)
        self.steps = 0
        named = {k: p for k, p in model.named_parameters() if p.requires_grad}
        buffers = {k for k, _ in model.named_buffers()}
        for key, value in (correction or {}).items():
            if key in named:
                p = named[key]
                self.shifts.append((p, value.detach().to(device=p.device, dtype=p.dtype)))
                self.tracked[key] = (p, torch.zeros_like(p, memory_format=torch.contiguous_format))
            elif key not in buffers:
                raise KeyError(f"SCAFFOLD correction {key!r} is not a tensor of this model")
        if self.mu <= 0:
            return
        if anchor is None:
            self.pairs = [(p, p.detach().clone()) for p in named.values()]
            return
        for key, value in anchor.items():
            if key in named:
                p = named[key]
                self.pairs.append((p, value.detach().to(device=p.device, dtype=p.dtype)))
            elif key not in buffers:
                raise KeyError(f"FedProx anchor {key!r} is not a tensor of this model")

    def add_gradient(self) -> None:
        """``p.grad += mu * (p - anchor) + (c - c_i)`` for each parameter the terms name, after the
        gradient as it came is summed."""
        with torch.no_grad():
            if self.tracked:
                self.steps += 1
                for p, total in self.tracked.values():
                    if p.grad is not None:
                        total.add_(p.grad)
            for p, a in self.pairs:
                pull = (p - a).mul_(self.mu)
                if p.grad is None:
                    p.grad = pull
                else:
                    p.grad.add_(pull)
            for p, shift in self.shifts:
                if p.grad is None:
                    p.grad = shift.clone()
                else:
                    p.grad.add_(shift)

    def mean_gradient(self) -> dict[str, np.ndarray] | None:
        """The mean of the gradients the terms were added to, per tracked parameter (None: none
        tracked); zero where no step was taken."""
        if not self.tracked:
            return None
        scale = 1.0 / max(self.steps, 1)
        return {k: (total * scale).cpu().numpy().astype(np.float32) for k, (_, total) in self.tracked.items()}


class _PlainSteps:
    """Shuffled minibatches, ``epochs`` passes, or passes until ``steps`` minibatches (the last
    pass cut short); the round's :class:`DriftTerms` added before each update."""

    def __init__(self, model: nn.Module, data: Split, opt: torch.optim.Optimizer, *, epochs: int | None,
                 steps: int | None, batch_size: int, terms: DriftTerms, task: str, accel: Accel,
                 device: torch.device) -> None:
        if (epochs is None) == (steps is None):
            raise ValueError("train for a number of epochs or a number of steps, one of the two")
        self.model, self.data, self.opt = model, data, opt
        self.forward, self.accel, self.device = accel.forward_of(model), accel, device
        self.scaler = accel.scaler(device)
        self.epochs, self.steps, self.batch_size, self.task = epochs, steps, batch_size, task
        self.terms = terms

    def batches(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, taken, passes = len(self.data), 0, 0
        while (self.epochs is None or passes < self.epochs) and n > 0:
            order = torch.randperm(n, generator=gen)
            passes, before = passes + 1, taken
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                if len(idx) < 2 and n >= 2:
                    continue  # BatchNorm cannot train on a batch of one
                if self.steps is not None and taken >= self.steps:
                    return
                taken += 1
                yield self.data.images[idx], self.data.labels[idx]
            if taken == before:
                return  # batches of one only: nothing to train on, however many passes

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with self.accel.autocast(self.device):
            logits = self.forward(x)
        loss = loss_fn(logits.float(), y, self.task)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.terms.add_gradient()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)  # the data-free terms join the true, unscaled gradient
            self.terms.add_gradient()
            self.scaler.step(self.opt)
            self.scaler.update()
        return float(loss.detach())


def train_local(
    model: nn.Module,
    data: Split,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int,
    lr: float,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    anchor: Mapping[str, torch.Tensor] | None = None,
    correction: Mapping[str, torch.Tensor] | None = None,
    augment: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    task: str = "binary",
    optimizer_state: dict | None = None,
    on_step: OnStep | None = None,
    accel: Accel = PLAIN,
) -> TrainResult:
    """Train in place, for ``epochs`` passes over ``data`` or for ``steps`` minibatches (one of
    the two; a fixed step count takes the same work whatever the data size). With ``mu > 0`` adds FedProx's ``mu/2 * ||w - w_global||^2`` over the
    parameters named in ``anchor`` (the global shared tensors; ``None``: all, at their start),
    and SCAFFOLD's ``correction`` (``c - c_i`` by parameter name), as :class:`DriftTerms` says,
    the same as ``privacy.engine.train_dp`` does.

    ``optimizer_state`` (a previous result's) resumes the optimizer's moments instead of starting
    them from zero; the learning rate and weight decay given here still apply.  ``accel``: how
    this hardware runs it (``train/accel.py``), which does not change what is trained.
    """
    model.train()
    accel.prepare(model)
    device = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    resume_optimizer(opt, optimizer_state)
    plain = _PlainSteps(model, data, opt, epochs=epochs, steps=steps, batch_size=batch_size,
                        terms=DriftTerms(model, mu, anchor, correction), task=task, accel=accel, device=device)
    total, done = run_steps(plain, augment=augment, gen=torch.Generator().manual_seed(seed), device=device,
                            on_step=on_step, accel=accel)
    return TrainResult(num_samples=len(data), loss=total / max(done, 1), steps=done, optimizer_state=opt.state_dict(),
                       mean_gradient=plain.terms.mean_gradient())


def resume_optimizer(opt: torch.optim.Optimizer, state: dict | None) -> None:
    """Load a saved optimizer state's moments, keeping this call's hyper-parameters."""
    if not state:
        return
    groups = [dict(g) for g in opt.state_dict()["param_groups"]]
    opt.load_state_dict({"state": state["state"], "param_groups": groups})


def loss_fn(logits: torch.Tensor, y: torch.Tensor, task: str, reduction: str = "mean") -> torch.Tensor:
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y, reduction=reduction)
    return F.cross_entropy(logits, y, reduction=reduction)


def scores_of(logits: torch.Tensor, task: str) -> torch.Tensor:
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Split, *, batch_size: int = 512, device: torch.device | str = "cpu", task: str = "binary",
    accel: Accel = PLAIN,
) -> EvalResult:
    """Loss, accuracy and AUC: binary, the positive class's score; multi-class, macro one-vs-rest;
    multi-label, the mean over labels that have both values present (accuracy: per label at 0.5)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    probs, losses = [], 0.0
    for start in range(0, len(data), batch_size):
        x = accel.layout(as_float(accel.to_device(data.images[start : start + batch_size], device)))
        y = accel.to_device(data.labels[start : start + batch_size], device)
        with accel.autocast(device):
            logits = model(x)
        logits = logits.float()
        losses += float(loss_fn(logits, y, task, reduction="sum"))
        probs.append(scores_of(logits, task).cpu())
    model.train(was_training)
    n = len(data)
    p = torch.cat(probs).numpy() if probs else np.zeros((0, 2), dtype=np.float32)
    y = data.labels.numpy()
    return EvalResult(
        num_examples=n,
        loss=losses / max(n, 1) / (y.shape[1] if y.ndim == 2 else 1),
        accuracy=accuracy_score(y, p),
        auc=auc_score(y, p),
        scores=p,
        labels=y,
    )
