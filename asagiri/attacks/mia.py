"""Membership-inference experiments on models the product trains.

Targets: one site's local model (the site trains on its own data with the product's training
loop, plain or DP-SGD), and the global model of a recorded run.  Members are a site's training
images; non-members are held-out images of the same site, drawn as its training data was (its
validation and test shares).  The smallest and the largest site of the label-skew split are
attacked.  Reference models for offline LiRA are trained by the same code on other sites'
training data, at the target site's size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import load_site_data
from ..models import build, prepare_data
from ..privacy.engine import dp_compatible, noise_for_target, steps_per_round, train_dp
from ..splits import SiteData, Split
from ..train.loop import train_local
from .membership import lira_offline, loss_threshold
from .scores import membership_scores

__all__ = ["MiaSettings", "accuracy", "attack_model", "balanced", "site_model_attack", "train_like_a_site"]


@dataclass(frozen=True)
class MiaSettings:
    dataset: str = "pneumoniamnist"
    path: Path | None = None  # None: the bundled data
    model: str = "scatter_linear"
    sites: int = 4
    scheme: str = "dirichlet"  # the label-skew split of docs/results.md; "iid" for sites with both classes
    alpha: float = 0.3
    split_seed: int = 0
    epochs: int = 30  # the target site trains long on its own data: the overfit case
    batch_size: int = 16
    lr: float = 0.01
    optimizer: str = "sgd"
    references: int = 4
    others: int = 8  # sites besides the target whose data feeds the reference models and the non-members
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 0.1
    seed: int = 0


def balanced(members: Split, pool: Split, seed: int) -> tuple[Split, Split]:
    """Members, and as many non-members drawn from ``pool`` with the members' label mix, class by
    class: otherwise the attack could score the label distribution, not membership."""
    gen = torch.Generator().manual_seed(seed)
    m_idx, n_idx = [], []
    for c in torch.unique(members.labels):
        mine = torch.nonzero(members.labels == c).view(-1)
        theirs = torch.nonzero(pool.labels == c).view(-1)
        k = min(len(mine), len(theirs))
        m_idx.append(mine[torch.randperm(len(mine), generator=gen)[:k]])
        n_idx.append(theirs[torch.randperm(len(theirs), generator=gen)[:k]])
    mi, ni = torch.cat(m_idx), torch.cat(n_idx)
    return Split(members.images[mi], members.labels[mi]), Split(pool.images[ni], pool.labels[ni])


def _site(s: MiaSettings, i: int) -> SiteData:
    return prepare_data(s.model, load_site_data(dataset=s.dataset, path=s.path, site_index=i, num_sites=s.sites,
                                                scheme=s.scheme, alpha=s.alpha, seed=s.split_seed))


def _target_and_others(s: MiaSettings, which: str) -> tuple[SiteData, list[SiteData]]:
    """The smallest or largest site, and up to ``others`` more.  IID shares are all one size: the
    first is the target, and only the sites used are loaded."""
    if s.scheme == "iid":
        return _site(s, 0), [_site(s, i) for i in range(1, min(s.sites, s.others + 1))]
    sites = [_site(s, i) for i in range(s.sites)]
    sizes = [len(d.train) for d in sites]
    k = int(np.argmin(sizes) if which == "smallest" else np.argmax(sizes))
    return sites[k], [d for i, d in enumerate(sites) if i != k][: s.others]


def train_like_a_site(model: nn.Module, data: Split, s: MiaSettings, *, private: bool, seed: int,
                      task: str) -> nn.Module:
    """Train ``model`` on ``data`` for ``s.epochs`` as a site does: ``train_local``, or DP-SGD with
    sigma planned to spend ``s.epsilon`` over those epochs."""
    torch.manual_seed(seed)
    if private:
        model, _ = dp_compatible(model)
        q, steps = steps_per_round(len(data), s.batch_size, 1)
        sigma = noise_for_target(target_epsilon=s.epsilon, delta=s.delta, sample_rate=q, steps=steps * s.epochs)
        for epoch in range(s.epochs):
            train_dp(model, data, epochs=1, expected_batch=s.batch_size, lr=s.lr, optimizer=s.optimizer,
                     momentum=0.9, noise_multiplier=sigma, max_grad_norm=s.max_grad_norm, augment=False,
                     seed=seed * 1000 + epoch, task=task)
    else:
        train_local(model, data, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, optimizer=s.optimizer,
                    augment=False, seed=seed, task=task)
    return model


def _train(data: Split, s: MiaSettings, *, private: bool, seed: int, channels: int, classes: int, task: str) -> nn.Module:
    torch.manual_seed(seed)
    model = build(s.model, in_channels=channels, num_classes=classes, width=32, norm="group", groups=32)
    return train_like_a_site(model, data, s, private=private, seed=seed, task=task)


def attack_model(target: nn.Module, references: list[nn.Module], members: Split, nonmembers: Split,
                 task: str) -> dict[str, Any]:
    """Both attacks on ``target``: per-example scores of the members against the non-members."""
    both = Split(torch.cat([members.images, nonmembers.images]), torch.cat([members.labels, nonmembers.labels]))
    n = len(members)
    loss = loss_threshold(target, both, task)
    lira = lira_offline(target, references, both, task)
    return {"loss_threshold": membership_scores(loss[:n], loss[n:]),
            "lira_offline": membership_scores(lira[:n], lira[n:])}


def site_model_attack(s: MiaSettings, *, which: str, private: bool) -> dict[str, Any]:
    """Attack the local model of the smallest (``which="smallest"``) or largest site."""
    site, others = _target_and_others(s, which)
    # Non-members: images no model here trained on (the sites' validation and test shares).
    held_out = Split(torch.cat([x for d in (site, *others) for x in (d.val.images, d.test.images)]),
                     torch.cat([y for d in (site, *others) for y in (d.val.labels, d.test.labels)]))
    members, nonmembers = balanced(site.train, held_out, s.seed)
    shape = dict(channels=site.channels, classes=site.num_classes, task=site.task)
    target = _train(site.train, s, private=private, seed=s.seed, **shape)
    population = Split(torch.cat([d.train.images for d in others]), torch.cat([d.train.labels for d in others]))
    gen = torch.Generator().manual_seed(s.seed + 1)
    references = []
    for r in range(s.references):
        idx = torch.randperm(len(population), generator=gen)[: len(site.train)]
        references.append(_train(Split(population.images[idx], population.labels[idx]), s, private=private,
                                 seed=s.seed + 100 + r, **shape))
    out: dict[str, Any] = {"site_images": len(site.train), "private": private,
                           "train_accuracy": accuracy(target, site.train), "heldout_accuracy": accuracy(target, held_out)}
    out.update(attack_model(target, references, members, nonmembers, site.task))
    return out


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    m = copy.deepcopy(model).eval()
    pred = m(data.images).argmax(1)
    return round(float((pred == data.labels.long().view(-1)).float().mean()), 4)
