"""Attacks on what a recorded run's coordinator held: each round's aggregate (scenario f) and the
final global model (membership inference).

A run keeps every round's global model in ``run_dir/models/`` with ``keep_models: true``; its
checkpoint always holds the last one.  The data, model and training settings are the run's own
(``run_dir/config/fed.yaml``), and the sites' shares are loaded as the sites loaded them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import FederationConfig, load_federation
from ..data import load_configured_site
from ..initial import global_norm, initial_params
from ..models import build, prepare_data
from ..observe.recorder import model_path
from ..splits import SiteData, Split
from .inversion import idlg_label, inverting_gradients
from .mia import MiaSettings, accuracy, attack_model, balanced, train_like_a_site
from .scenarios import BOUNDS, DATA_RANGE, IG, InversionResult, Settings
from .scores import ImageScores, closest_image

__all__ = ["RecordedRun", "global_model_attack", "recorded_round"]


class RunError(ValueError):
    """The run folder lacks what the attack needs."""


@dataclass
class RecordedRun:
    cfg: FederationConfig
    sites: list[SiteData]
    run_dir: Path

    @classmethod
    def open(cls, run_dir: Path) -> RecordedRun:
        fed = run_dir / "config" / "fed.yaml"
        if not fed.exists():
            raise RunError(f"{run_dir}: not a run folder (no config/fed.yaml)")
        cfg = load_federation(fed)
        sites = [prepare_data(cfg.model.name, load_configured_site(cfg.data, path=cfg.data.path, site_index=i,
                                                                   num_sites=len(cfg.sites)))
                 for i in range(len(cfg.sites))]
        return cls(cfg, sites, run_dir)

    def model(self, params: dict[str, np.ndarray] | None = None) -> nn.Module:
        """The run's model, with ``params`` (a global model) loaded; parameters the sites keep
        (FedBN) stay at their initial values."""
        cfg = self.cfg
        norm, groups = global_norm(cfg.model, dp=cfg.dp.enabled)
        torch.manual_seed(cfg.selection.seed)
        model = build(cfg.model.name, in_channels=self.sites[0].channels, num_classes=self.sites[0].num_classes,
                      width=cfg.model.width, norm=norm, groups=groups)
        if params is not None:
            model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=False)
        return model

    def global_model(self, rnd: int | None) -> tuple[int, dict[str, np.ndarray]]:
        """The global model after round ``rnd`` (kept models), or after the last completed round."""
        from ..observe.checkpoint import load_checkpoint
        from ..observe.recorder import CHECKPOINT_NAME

        if rnd is None:
            path = self.run_dir / CHECKPOINT_NAME
            if not path.exists():
                raise RunError(f"{self.run_dir}: no round completed (no {CHECKPOINT_NAME})")
            params, _, state = load_checkpoint(path)
            return int(state["round"]), params
        path = model_path(self.run_dir, rnd)
        if not path.exists():
            raise RunError(f"{path}: missing; a run keeps each round's model only with keep_models: true")
        return rnd, dict(np.load(path))

    def train_pool(self) -> Split:
        return Split(torch.cat([d.train.images for d in self.sites]), torch.cat([d.train.labels for d in self.sites]))

    def held_out(self) -> Split:
        """Images no site trained on: every site's validation and test shares."""
        parts = [s for d in self.sites for s in (d.val, d.test)]
        return Split(torch.cat([s.images for s in parts]), torch.cat([s.labels for s in parts]))


def recorded_round(run_dir: Path, rnd: int, s: Settings) -> InversionResult:
    """Scenario f: what a run's coordinator actually held in round ``rnd``: the difference of the
    global models before and after it (``keep_models``), which is the sites' weighted mean update.
    The attacker reconstructs ``s.images`` images, with the label iDLG's rule gives, and each is
    scored against the closest of every site's training images (``best match``)."""
    run = RecordedRun.open(run_dir)
    t0 = time.perf_counter()
    _, after = run.global_model(rnd)
    before = initial_params(run.cfg) if rnd == 1 else run.global_model(rnd - 1)[1]
    model = run.model(before).train()
    pool = run.train_pool().images
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
    matches = [closest_image(data, r, data_range=DATA_RANGE) for r in recon]
    closest = [i for i, _, _ in matches]
    scores = ImageScores([s for _, s, _ in matches], [p for _, _, p in matches],
                         "best match among the sites' training images", list(range(len(recon))))
    # The control for a best-match score: the training images' mean, an "attack" that learned
    # nothing, scored the same way. A reconstruction below it shows nothing of any one image.
    _, control, _ = closest_image(data, data.mean(0), data_range=DATA_RANGE)
    cfg = run.cfg
    return InversionResult(
        "recorded", f"{cfg.model.name}/{global_norm(cfg.model, dp=cfg.dp.enabled)[0]}", IG,
        f"round {rnd} of run {cfg.run_id}: the aggregate over {len(pool)} training images of {len(run.sites)} sites",
        data[closest], recon, scores, None, time.perf_counter() - t0,
        {"gradient_match": round(inv.match, 5), "training_images": len(pool), "closest": closest,
         "control_mean_image_ssim": round(float(control), 4)})


def global_model_attack(run_dir: Path, rnd: int | None = None, *, references: int = 4,
                        seed: int = 0) -> dict[str, dict[str, Any]]:
    """Membership inference against a run's global model.  Members: all sites' training images,
    then the smallest and the largest site's alone.  Non-members: half of the held-out images,
    drawn in the members' label mix.  The other half trains the offline-LiRA reference models,
    with the run's model, training settings and DP, for as many epochs as the run trained
    (rounds x the average site's passes per round), so neither the target nor a reference saw a
    non-member."""
    run = RecordedRun.open(run_dir)
    cfg = run.cfg
    rnd, params = run.global_model(rnd)
    target = run.model(params).eval()
    held_out = run.held_out()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(held_out), generator=gen)
    half = len(order) // 2
    candidates = Split(held_out.images[order[:half]], held_out.labels[order[:half]])
    population = Split(held_out.images[order[half:]], held_out.labels[order[half:]])
    task = run.sites[0].task
    sizes = [len(d.train) for d in run.sites]
    mean_size = max(1, int(np.mean(sizes)))
    # as many passes over its data as the average site made in ``rnd`` rounds
    passes = rnd * cfg.train.steps_per_round(mean_size) * cfg.train.batch_size / mean_size
    train = MiaSettings(dataset=cfg.data.dataset, model=cfg.model.name, epochs=max(1, round(passes)),
                        batch_size=cfg.train.batch_size, lr=cfg.train.lr, optimizer=cfg.train.optimizer,
                        epsilon=cfg.dp.target_epsilon, delta=cfg.dp.target_delta,
                        max_grad_norm=cfg.dp.max_grad_norm, seed=seed)
    refs = [train_like_a_site(run.model(), population, train, private=cfg.dp.enabled, seed=seed + 100 + r,
                              task=task).eval() for r in range(references)]
    groups = {"all_sites": run.train_pool(), "smallest_site": run.sites[int(np.argmin(sizes))].train,
              "largest_site": run.sites[int(np.argmax(sizes))].train}
    out: dict[str, dict[str, Any]] = {}
    for name, members_pool in groups.items():
        members, nonmembers = balanced(members_pool, candidates, seed)
        out[f"global_{name}"] = {
            "target": f"the global model after round {rnd} of run {cfg.run_id}", "site_images": len(members_pool),
            "private": cfg.dp.enabled, "train_accuracy": accuracy(target, members_pool),
            "heldout_accuracy": accuracy(target, candidates), "reference_images": len(population),
            **attack_model(target, refs, members, nonmembers, task)}
    return out
