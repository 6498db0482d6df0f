"""Membership inference: was this image in the training data of that model?

- **Loss threshold** (Yeom et al. 2018): members have lower loss; the score is ``-loss``.
- **Offline LiRA** (Carlini et al. 2022): for each candidate, the logit-scaled confidence of the
  true class under reference models that never saw it (trained by the same code on population
  data) gives a Gaussian "out" distribution; the target model's confidence, standardised against
  it, is the score.  Offline: no reference model is trained with the candidates in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..splits import Split
from ..train.loop import loss_fn, scores_of

__all__ = ["confidence", "lira_offline", "loss_threshold"]


@torch.no_grad()
def _logits(model: nn.Module, data: Split, batch: int = 512) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(data.images[i : i + batch]) for i in range(0, len(data), batch)])
    model.train(was)
    return out


@torch.no_grad()
def loss_threshold(model: nn.Module, data: Split, task: str) -> np.ndarray:
    """Per-example ``-loss``: higher means more likely a member."""
    return -loss_fn(_logits(model, data), data.labels, task, reduction="none").reshape(len(data), -1).mean(1).numpy()


@torch.no_grad()
def confidence(model: nn.Module, data: Split, task: str) -> np.ndarray:
    """Per-example logit-scaled confidence in the true label, ``log p - log(1 - p)``."""
    probs = scores_of(_logits(model, data), task).double()
    if task == "multilabel":
        p = torch.where(data.labels > 0.5, probs, 1 - probs).mean(1)
    else:
        p = probs.gather(1, data.labels.long().view(-1, 1)).squeeze(1)
    p = p.clamp(1e-12, 1 - 1e-12)
    return (torch.log(p) - torch.log1p(-p)).numpy()


def lira_offline(target: nn.Module, references: Sequence[nn.Module], data: Split, task: str) -> np.ndarray:
    """Per-example score: the target's confidence, standardised against the references' (which
    never trained on ``data``)."""
    if len(references) < 2:
        raise ValueError("offline LiRA needs at least two reference models")
    ref = np.stack([confidence(m, data, task) for m in references])
    mu, sigma = ref.mean(0), ref.std(0) + 1e-6
    return (confidence(target, data, task) - mu) / sigma
