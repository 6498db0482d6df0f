"""The inversion matrix's settings: light, so the command line can show their defaults without
loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import FederationConfig

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    """How big each run is; every field goes into the report.  ``from_config`` takes the model,
    training and DP settings from the runtime's config."""

    norm: str = "group"  # small_cnn's normalisation: GroupNorm is what every DP site trains
    width: int = 32
    groups: int = 32
    images: int = 4  # images attacked one by one, and behind a multi-image observation
    local_epochs: int = 2  # local passes over the batch for the update scenarios
    lr: float = 1e-3
    optimizer: str = "adam"
    sites: int = 4
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    rounds: int = 3  # what a site plans its sigma over
    iterations: int = 2000
    restarts: int = 1
    feature_iterations: int = 500  # scatter_single: inverting the ScatterNet transform
    tv: float = 1e-2
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: FederationConfig, **attack: Any) -> Settings:
        """The runtime's model (width, groups), training (lr, optimizer) and DP (epsilon, delta,
        clip, rounds) settings, and the attack's own (``attack``: norm, images, iterations...)."""
        return cls(width=cfg.model.width, groups=cfg.model.groups, lr=cfg.train.lr, optimizer=cfg.train.optimizer,
                   epsilon=cfg.dp.target_epsilon, delta=cfg.dp.target_delta, max_grad_norm=cfg.dp.max_grad_norm,
                   rounds=cfg.rounds, **attack)
