"""A site's own SCAFFOLD control variate ``c_i`` (Karimireddy et al. 2020): it never leaves the site.

Each round the site trains with the correction ``c - c_i`` (``c``: the server's control variate,
from the models the site derives itself, SPEC §6.9), and proposes ``c_i+``, the round's mean
gradient; ``c_i+ - c_i`` goes into the secure sum beside its update.  The proposal is adopted only
when the round's step is committed with this site among the sum's survivors, so that ``c``, which
moves by the sums' control deltas, stays the mean of the sites' ``c_i``: a round that aborted, or
summed without this site, leaves ``c_i`` as it was.  Kept in ``state_dir`` per run, so a restarted
site goes on with its own.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write_bytes
from ..params import CONTROL, Params, is_statistic, load_tensors, pack_tensors

__all__ = ["OwnControl"]

log = logging.getLogger(__name__)


class OwnControl:
    """``c_i`` over the trained tensors of ``template`` (a model's shared tensors), zero at first."""

    def __init__(self, *, run_id: str, spec_digest: bytes, template: Params, path: Path | None) -> None:
        self.run_id, self.spec_digest, self.path = run_id, spec_digest, path
        self.value: Params = {k: np.zeros_like(v, dtype=np.float32) for k, v in template.items() if not is_statistic(k)}
        self.round = 0  # the round whose proposal was adopted last
        self._proposed: dict[int, Params] = {}
        self._resume()

    def correction(self, server: Params | None) -> Params:
        """``c - c_i`` per trained tensor; ``server``: the derived model's optimiser state, whose
        ``c/`` tensors are ``c`` (none yet: zero)."""
        server = server or {}
        return {k: (server[CONTROL + k] - v if CONTROL + k in server else -v).astype(np.float32)
                for k, v in self.value.items()}

    def propose(self, rnd: int, mean_gradient: Params) -> Params:
        """The round's ``c_i+`` (its mean gradient; zero for a tensor it has none for): returns
        ``c_i+ - c_i``, what the site sends inside the sum, by the ``c/`` names."""
        new = {k: np.asarray(mean_gradient.get(k, np.zeros_like(v)), dtype=np.float32).reshape(v.shape)
               for k, v in self.value.items()}
        self._proposed[rnd] = new
        return {CONTROL + k: (new[k] - self.value[k]).astype(np.float32) for k in new}

    def committed(self, rnd: int, included: bool) -> None:
        """Round ``rnd``'s step was committed: adopt its proposal if this site's input was in the
        sum (``included``); proposals of that round and earlier are let go either way."""
        new = self._proposed.get(rnd)
        self._proposed = {r: v for r, v in self._proposed.items() if r > rnd}
        if not included or new is None:
            return
        self.value, self.round = new, rnd
        if self.path is not None:
            state = {"run_id": self.run_id, "spec_digest": self.spec_digest.hex(), "round": rnd}
            atomic_write_bytes(self.path, pack_tensors(self.value, None, state))

    def _resume(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            value, _, state = load_tensors(self.path)
        except (OSError, ValueError, KeyError) as exc:
            log.error("%s cannot be read (%s): this site's control variate starts again from zero", self.path, exc)
            return
        ours = (state.get("run_id"), state.get("spec_digest")) == (self.run_id, self.spec_digest.hex())
        same = [(k, v.shape) for k, v in value.items()] == [(k, v.shape) for k, v in self.value.items()]
        if ours and same:
            self.value, self.round = {k: v.astype(np.float32) for k, v in value.items()}, int(state["round"])
            log.info("resuming this site's control variate from round %d", self.round)
