"""The round-0 global model of a run, ``W_0``: a function of the run's id and spec alone
(protocol/SPEC.md §6.9).

Both sides build it with :func:`derived_initial`: the coordinator's composition roots
(``asagiri-coordinator``, ``asagiri.local``, the tests) through :func:`initial_params`, and each
site in its worker (``site/worker.py``), which trains on nothing else (``policy.derive_models``).
The key is a hash of the run id and of what in the spec decides the model's tensors, not
``selection.seed`` or any other number the coordinator chooses apart from what the site joins:
a coordinator that wanted a crafted ``W_0`` would have to find a run id whose hash gives one.

torch builds the layout only.  Every convolution's and linear layer's weight and bias is then
drawn as torch's default initialisation draws it, uniform on ``±1/sqrt(fan_in)``, but from
ChaCha20 under a key of its own (``H(key ‖ tensor name)``), in float32 arithmetic NumPy does the
same way everywhere; normalisation layers keep their constant ones and zeros.  So ``W_0`` is the
same bits on every machine and torch release, a third party can compute it from the spec, and no
other thread's use of torch's global generator (sites in one process) can move it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from .config import FederationConfig, ModelConfig, RunSpec
from .data.loaders import dataset_info
from .models import build, dp_norm, shared_keys
from .params import Params
from .secagg.binding import canonical
from .secagg.prg import expand
from .wire.crypto import blake2b

__all__ = ["architecture", "derived_initial", "global_norm", "initial_key", "initial_params"]


def architecture(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What of a run's spec decides the model's tensors: the model, the data set (its channels and
    classes), DP-SGD (its normalisation) and FedBN (which tensors are shared)."""
    return {"model": dict(spec["model"]), "dataset": spec["data"]["dataset"], "dp": bool(spec["dp"]["enabled"]),
            "fedbn": bool(spec["strategy"]["fedbn"])}


def initial_key(run_id: str, spec: Mapping[str, Any]) -> bytes:
    """``W_0``'s key: ``H("asagiri-init", run_id ‖ 0x00 ‖ canonical(architecture(spec)))``.  Runs
    under one ``run_id`` whose specs differ in anything else (the learning rate, secure
    aggregation) start from the same model, so they can be compared."""
    return blake2b(run_id.encode() + b"\0" + canonical(architecture(spec)), person=b"asagiri-init")


def global_norm(model: ModelConfig, *, dp: bool) -> tuple[str, int]:
    """The global model's normalisation and groups: the sites convert BatchNorm to GroupNorm for
    DP-SGD, so the global model (and anything rebuilding it) must too."""
    return dp_norm(model.name, model.norm, model.groups) if dp else (model.norm, model.groups)


def _uniform(key: bytes, name: str, shape: tuple[int, ...], bound: float) -> np.ndarray:
    """``(2u - 1) * bound`` for ``u = (w >> 8) / 2^24``, ``w`` ChaCha20's little-endian uint32 words."""
    count = math.prod(shape)
    words = expand(blake2b(key + name.encode(), person=b"asagiri-w0"), count, np.uint32, prg="chacha20")
    u = (words >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    return ((np.float32(2) * u - np.float32(1)) * np.float32(bound)).reshape(shape)


def derived_initial(model: ModelConfig, *, dp: bool, fedbn: bool, channels: int, classes: int, key: bytes) -> Params:
    """``W_0``: the shared tensors of the configured model, drawn under ``key``."""
    norm, groups = global_norm(model, dp=dp)
    net = build(model.name, in_channels=channels, num_classes=classes, width=model.width, norm=norm, groups=groups)
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    for prefix, module in net.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            fan_in = math.prod(module.weight.shape[1:])
            for kind in ("weight", "bias"):
                name = f"{prefix}.{kind}" if prefix else kind
                if name in state:
                    state[name] = _uniform(key, name, state[name].shape, 1 / math.sqrt(fan_in))
    return {k: state[k] for k in shared_keys(net, fedbn=fedbn)}


def initial_params(cfg: FederationConfig) -> Params:
    """The run's ``W_0`` as the coordinator builds it, from its config."""
    channels, classes = dataset_info(cfg.data.dataset, cfg.data.path)
    return derived_initial(cfg.model, dp=cfg.dp.enabled, fedbn=cfg.strategy.fedbn, channels=channels,
                           classes=classes, key=initial_key(cfg.run_id, RunSpec.of(cfg).wire()))
