"""The round-0 global model of a run, built from its config with a fixed seed.

The coordinator never builds a torch model: its composition roots (``asagiri-coordinator``,
``asagiri.local``, the tests) build the initial parameters here and hand them to
:class:`~asagiri.coordinator.server.Coordinator`.  The recorded-run attack rebuilds the same model.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import FederationConfig
from .data.loaders import dataset_info
from .models import build, dp_norm, shared_keys
from .params import Params

__all__ = ["global_norm", "initial_params"]


def global_norm(cfg: FederationConfig) -> tuple[str, int]:
    """The global model's normalisation and groups: the sites convert BatchNorm to GroupNorm for
    DP-SGD, so the global model (and anything rebuilding it) must too."""
    if cfg.dp.enabled:
        return dp_norm(cfg.model.name, cfg.model.norm, cfg.model.groups)
    return cfg.model.norm, cfg.model.groups


def initial_params(cfg: FederationConfig) -> Params:
    """The round-0 global model: built from config with a fixed seed, shared tensors only."""
    channels, classes = dataset_info(cfg.data.dataset, cfg.data.path)
    torch.manual_seed(cfg.selection.seed)
    norm, groups = global_norm(cfg)
    model = build(cfg.model.name, in_channels=channels, num_classes=classes, width=cfg.model.width, norm=norm,
                  groups=groups)
    state = model.state_dict()
    return {k: state[k].detach().cpu().numpy().astype(np.float32) for k in shared_keys(model, fedbn=cfg.strategy.fedbn)}
