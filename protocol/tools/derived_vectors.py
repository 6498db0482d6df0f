"""Vectors of SPEC §6.9: ``W_0`` of a run as every site derives it, produced by the package."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from asagiri.config import FederationConfig, RunSpec
from asagiri.initial import architecture, derived_initial, initial_key
from asagiri.models import build, shared_keys
from asagiri.secagg.binding import canonical, params_digest

__all__ = ["derived_vectors"]


def derived_vectors() -> list[dict[str, Any]]:
    """A small model per case: each tensor's name, shape and how §6.9 fills it, and its values."""
    out = []
    for model, fedbn in (({"name": "small_cnn", "width": 4, "norm": "group", "groups": 2}, False),
                         ({"name": "small_cnn", "width": 4, "norm": "batch"}, True)):
        cfg = FederationConfig.model_validate({"run_id": "vector-run", "model": model, "strategy": {"fedbn": fedbn},
                                               "data": {"dataset": "synthetic"}})
        spec = RunSpec.of(cfg).wire()
        key = initial_key(cfg.run_id, spec)
        w0 = derived_initial(cfg.model, dp=False, fedbn=fedbn, channels=1, classes=2, key=key)
        net = build(cfg.model.name, in_channels=1, num_classes=2, width=cfg.model.width, norm=cfg.model.norm,
                    groups=cfg.model.groups)
        modules = dict(net.named_modules())
        tensors = []
        for name in shared_keys(net, fedbn=fedbn):
            owner, _, kind = name.rpartition(".")
            module = modules[owner]
            if isinstance(module, nn.Conv2d | nn.Linear):
                fill: Any = {"uniform": {"fan_in": int(np.prod(module.weight.shape[1:]))}}
            else:
                fill = "ones" if kind in ("weight", "running_var") else "zeros"
            tensors.append({"name": name, "shape": list(w0[name].shape), "fill": fill,
                            "values_hex": w0[name].astype("<f4").tobytes().hex()})
        out.append({"run_id": cfg.run_id, "architecture": architecture(spec),
                    "architecture_canonical_hex": canonical(architecture(spec)).hex(), "key_hex": key.hex(),
                    "tensors": tensors, "params_digest_hex": params_digest(w0).hex()})
    return out
