"""Atomic checkpoints: one ``.npz`` holding the global tensors and a JSON resume state.

Written to a temporary file, fsynced, renamed over the old one, and the folder fsynced, so a
crash at any instant leaves either the previous checkpoint or the new one, never a torn file.
Loaded with ``allow_pickle=False``: nothing in a checkpoint is ever unpickled.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..fsutil import atomic_write_bytes
from ..params import Params

__all__ = ["load_checkpoint", "save_checkpoint"]

_STATE_KEY = "__state__"
_PARAM_PREFIX = "param/"
_VELOCITY_PREFIX = "velocity/"


def save_checkpoint(path: Path, *, params: Params, velocity: Params | None, state: dict[str, Any]) -> None:
    arrays: dict[str, np.ndarray] = {_PARAM_PREFIX + k: v for k, v in params.items()}
    if velocity is not None:
        arrays.update({_VELOCITY_PREFIX + k: v for k, v in velocity.items()})
    arrays[_STATE_KEY] = np.frombuffer(json.dumps(state, sort_keys=True).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> tuple[Params, Params | None, dict[str, Any]]:
    with np.load(path, allow_pickle=False) as npz:
        state = json.loads(npz[_STATE_KEY].tobytes().decode())
        params = {k[len(_PARAM_PREFIX) :]: npz[k] for k in npz.files if k.startswith(_PARAM_PREFIX)}
        velocity = {k[len(_VELOCITY_PREFIX) :]: npz[k] for k in npz.files if k.startswith(_VELOCITY_PREFIX)}
    return params, (velocity or None), state
