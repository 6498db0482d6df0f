"""Model tensors as they travel and aggregate: ``Params``, and the flat layout secure aggregation
masks.  A leaf module (it imports nothing of ours), so the wire, the strategies and both runtimes
can share it without depending on each other."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CONTROL", "Params", "flatten", "is_statistic", "load_tensors", "pack_tensors", "params_digest",
           "summed_layout", "unflatten", "update_norm"]

# Tensor name -> array, in the model's order (the wire order of FitIns.params).
Params = dict[str, np.ndarray]

# Normalisation layers' running statistics (torch's names for BatchNorm and InstanceNorm buffers).
STATISTIC_SUFFIXES = (".running_mean", ".running_var")
# SCAFFOLD's control variates: the server's in its optimiser state, each site's delta in the
# secure sum, one per trained tensor, named by the tensor with this prefix (SPEC §6.3).
CONTROL = "c/"


def is_statistic(key: str) -> bool:
    """A running statistic, not a trained weight: averaged, never given a server step, momentum
    or control variate."""
    return key.endswith(STATISTIC_SUFFIXES) or key in ("running_mean", "running_var")


def summed_layout(params: Params, *, controls: bool) -> Params:
    """What a round sums for a model, in order (SPEC §6.3): its tensors, then (``controls``,
    SCAFFOLD) one control-variate tensor per trained tensor, named ``c/<tensor>``."""
    if not controls:
        return params
    return {**params, **{CONTROL + k: v for k, v in params.items() if not is_statistic(k)}}


def flatten(params: Params) -> np.ndarray:
    """All tensors, in the dict's order, as one float32 vector (the secure-aggregation layout, SPEC §6.3)."""
    if not params:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in params.values()])


def unflatten(vector: np.ndarray, template: Params) -> Params:
    out, pos = {}, 0
    for k, ref in template.items():
        out[k] = vector[pos : pos + ref.size].reshape(ref.shape)
        pos += ref.size
    if pos != vector.size:
        raise ValueError(f"vector of {vector.size} values for {pos} parameters")
    return out


def params_digest(params: Params) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order: the model digest
    of the audit log, the checkpoint and the sites' receipts."""
    h = hashlib.sha256()
    for name in sorted(params):
        arr = np.require(params[name], requirements="C")
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def update_norm(params: Params) -> float:
    """The L2 norm of all tensors together, as one vector (in float64)."""
    return float(np.sqrt(sum(float(np.dot(v.ravel().astype(np.float64), v.ravel().astype(np.float64)))
                             for v in params.values())))


_STATE_KEY = "__state__"
_PARAM_PREFIX = "param/"
_VELOCITY_PREFIX = "velocity/"


def pack_tensors(params: Params, velocity: Params | None, state: dict[str, Any]) -> bytes:
    """A model, the server optimiser's state and a JSON state as one ``.npz`` (checkpoints, a
    site's trajectory): nothing in it is ever pickled."""
    arrays: dict[str, np.ndarray] = {_PARAM_PREFIX + k: v for k, v in params.items()}
    if velocity is not None:
        arrays.update({_VELOCITY_PREFIX + k: v for k, v in velocity.items()})
    arrays[_STATE_KEY] = np.frombuffer(json.dumps(state, sort_keys=True).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_tensors(path: Path) -> tuple[Params, Params | None, dict[str, Any]]:
    """What :func:`pack_tensors` wrote, loaded with ``allow_pickle=False``."""
    with np.load(path, allow_pickle=False) as npz:
        state = json.loads(npz[_STATE_KEY].tobytes().decode())
        params = {k[len(_PARAM_PREFIX) :]: npz[k] for k in npz.files if k.startswith(_PARAM_PREFIX)}
        velocity = {k[len(_VELOCITY_PREFIX) :]: npz[k] for k in npz.files if k.startswith(_VELOCITY_PREFIX)}
    return params, (velocity or None), state
