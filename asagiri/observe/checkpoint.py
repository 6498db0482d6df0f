"""Atomic checkpoints: one ``.npz`` holding the global tensors and a JSON resume state.

Written to a temporary file, fsynced, renamed over the old one, and the folder fsynced, so a
crash at any instant leaves either the previous checkpoint or the new one, never a torn file.
Loaded with ``allow_pickle=False``: nothing in a checkpoint is ever unpickled.

A round's checkpoint is first staged (``checkpoint.next.npz``), and put in place only once the
round's audit record is written (``recorder.py``): the audit record is the commit.
:func:`settle_staged` finishes or undoes what a crash or a failed write left between the two.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write_bytes, replace_durably
from ..params import Params, load_tensors, pack_tensors

__all__ = ["STAGED_NAME", "load_checkpoint", "save_checkpoint", "settle_staged"]

log = logging.getLogger(__name__)

STAGED_NAME = "checkpoint.next.npz"

def save_checkpoint(path: Path, *, params: Params, velocity: Params | None, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, pack_tensors(params, velocity, state))


def load_checkpoint(path: Path) -> tuple[Params, Params | None, dict[str, Any]]:
    return load_tensors(path)


def settle_staged(staged: Path, checkpoint: Path, committed: dict[str, Any] | None) -> bool | None:
    """A staged checkpoint left behind is put in place if ``committed`` (the audit log's last
    ``round_completed`` record) names it (True), and removed otherwise (False): its round was
    never recorded, and is run again.  None: nothing was staged."""
    if not staged.exists():
        return None
    try:
        _, _, state = load_checkpoint(staged)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        state = {}
    keys = ("run_id", "round", "model_sha256")
    if committed is not None and all(state.get(k) == committed.get(k) for k in keys):
        replace_durably(staged, checkpoint)
        log.warning("round %d was recorded but its checkpoint not yet put in place: done now", state["round"])
        return True
    staged.unlink()
    log.warning("removed a staged checkpoint of round %s that was never recorded (it will be run again)",
                state.get("round", "?"))
    return False
