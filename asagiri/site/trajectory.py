"""The run's global model as a site derives it (protocol/SPEC.md §6.9, ``policy.derive_models``).

``W_0`` comes from the run alone (``asagiri/initial.py``); each next model is
``server_step(W_t, state_t, S_t)`` of a sum ``S_t`` the site verified (SPEC §6.8), dequantised
exactly as the coordinator's round does (``coordinator/round.py``, ``strategy/base.py``).  Both
are element-wise NumPy, so a site that starts from the same model gets the coordinator's next
model bit for bit (``tests/client/test_trajectory.py``), and it trains and evaluates on nothing
else: the coordinator's copy in ``FitIns`` or ``EvaluateIns`` is checked against the site's own
digest, never trusted.

A verified sum is *pending* until the coordinator commits the round: its signed record names the
sum, a ``FitIns`` asks for training on the model it gives, or a later round's sum builds on it.
A coordinator that crashed after the site verified a sum but before it recorded the round runs
the round again from ``W_t``, and the site goes along: the pending step is dropped, never half
taken.  Only committed steps are kept on disk (``state_dir/trajectory-<hash>.npz``, one per run),
so a restarted site goes on from the last one, and asks the coordinator for the sums it missed
(``ModelAt``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..aggregate import RunningSum, server_step
from ..config.spec import SpecStrategy
from ..fsutil import atomic_write_bytes
from ..params import Params, load_tensors, pack_tensors, summed_layout, unflatten
from ..secagg.binding import params_digest
from ..secagg.plan import QuantPlan
from ..secagg.quantize import dequantize

__all__ = ["Model", "Trajectory", "next_model"]

log = logging.getLogger(__name__)


def next_model(params: Params, velocity: Params | None, total: np.ndarray, plan: QuantPlan, strategy: SpecStrategy,
               survivors: int) -> tuple[Params, Params | None]:
    """``W_{t+1}`` (and the server optimiser's state) from ``W_t`` and a verified ring sum."""
    weighted, count = dequantize(total, plan)
    summed = RunningSum.from_totals(unflatten(weighted, summed_layout(params, controls=strategy.scaffold)), count,
                                    survivors)
    if summed.total_samples <= 0:
        return params, velocity  # as the coordinator's strategy: nothing to step with
    return server_step(params, velocity, summed, strategy)


@dataclass(frozen=True)
class Model:
    """One model of the trajectory: after round ``round`` (0: ``W_0``), with its digest (SPEC §6.2's
    params digest, the one every round's ``ctx`` binds)."""

    round: int
    params: Params
    velocity: Params | None
    digest: bytes

    @classmethod
    def of(cls, rnd: int, params: Params, velocity: Params | None) -> Model:
        return cls(rnd, params, velocity, params_digest(params))


@dataclass(frozen=True)
class _Pending:
    model: Model
    sum_digest: bytes  # the verified sum's (SPEC §6.8): the round record must name it
    included: bool = False  # this site's input is in the sum (it was a survivor)


class Trajectory:
    """The site's committed model and the one verified step that may follow it."""

    def __init__(self, *, run_id: str, spec_digest: bytes, initial: Params, strategy: SpecStrategy,
                 path: Path | None) -> None:
        self.run_id, self.spec_digest, self.strategy, self.path = run_id, spec_digest, strategy, path
        self.initial_digest = params_digest(initial)
        self.current = self._resumed(initial) or Model.of(0, initial, None)
        self.pending: _Pending | None = None
        # told (round, included) of each step committed: SCAFFOLD's own control variate follows it
        self.on_commit: Callable[[int, bool], None] | None = None
        self._evaluated = self._evaluations()  # "model digest hex:split", each evaluated once

    # -- evaluations -----------------------------------------------------------------------------

    @property
    def _evaluated_path(self) -> Path | None:
        return None if self.path is None else self.path.with_name(self.path.stem + ".evaluated.json")

    def _evaluations(self) -> set[str]:
        path = self._evaluated_path
        try:
            kept = json.loads(path.read_text()) if path is not None and path.exists() else {}
        except (OSError, ValueError) as exc:
            log.error("%s cannot be read (%s): evaluations of this run are counted from now", path, exc)
            return set()
        ours = isinstance(kept, dict) and kept.get("run_id") == self.run_id and \
            kept.get("spec_digest") == self.spec_digest.hex() and isinstance(kept.get("evaluated"), list)
        return {str(k) for k in kept["evaluated"]} if ours else set()

    def evaluate(self, digest: bytes, split: str) -> bool:
        """Whether model ``digest`` may be evaluated on ``split`` now: once each, across restarts."""
        key = f"{digest.hex()}:{split}"
        if key in self._evaluated:
            return False
        self._evaluated.add(key)
        if (path := self._evaluated_path) is not None:
            atomic_write_bytes(path, json.dumps({"run_id": self.run_id, "spec_digest": self.spec_digest.hex(),
                                                 "evaluated": sorted(self._evaluated)}).encode())
        return True

    def matches(self, run_id: str, spec_digest: bytes) -> bool:
        return (run_id, spec_digest) == (self.run_id, self.spec_digest)

    # -- which model a message names -------------------------------------------------------------

    @property
    def digests(self) -> tuple[bytes, ...]:
        """The models of this trajectory a message may name: the kept one, then the pending one."""
        return (self.current.digest,) if self.pending is None else (self.current.digest, self.pending.model.digest)

    def known(self, digest: bytes) -> Model | None:
        """The committed model or the pending one, if ``digest`` names it."""
        if digest == self.current.digest:
            return self.current
        if self.pending is not None and digest == self.pending.model.digest:
            return self.pending.model
        return None

    def train_on(self, digest: bytes) -> bool:
        """A FitIns names ``digest``: True if it is a model of this trajectory.  The pending model
        named this way is committed (the coordinator trains on it, so it kept the round); the
        kept model named this way drops the pending step (the coordinator runs that round again:
        it did not keep it)."""
        model = self.known(digest)
        if model is None:
            return False
        if model is self.current:
            self._drop("a FitIns names the model before it")
        else:
            self._commit()
        return True

    # -- steps -----------------------------------------------------------------------------------

    def verified(self, rnd: int, trained_on: bytes, total: np.ndarray, sum_digest: bytes, plan: QuantPlan,
                 survivors: int, *, included: bool = False) -> bool:
        """A sum verified for round ``rnd``, whose inputs were trained on model ``trained_on``
        (bound into the round's ``ctx``): it becomes the pending step.  False if it does not
        follow this trajectory (an older round, or a model this site does not hold).
        ``included``: this site's own input is in the sum."""
        base = self.known(trained_on)
        if base is None or rnd <= base.round:
            return False
        if base is not self.current:
            self._commit()  # a later round built on the pending model: its round was kept
        params, velocity = next_model(base.params, base.velocity, total, plan, self.strategy, survivors)
        self.pending = _Pending(Model.of(rnd, params, velocity), sum_digest, included)
        return True

    def recorded(self, rnd: int, sum_digest: bytes | None) -> None:
        """The coordinator's signed record of round ``rnd``, naming the sum it aggregated: the
        pending step of that round is kept if it is that sum's, and dropped if not (the round was
        run again, and its kept sum comes as a ``SumRecord``)."""
        p = self.pending
        if p is None or p.model.round != rnd:
            return
        if sum_digest == p.sum_digest:
            self._commit()
        else:
            self._drop("the round's record names another sum")

    def _drop(self, why: str) -> None:
        if self.pending is not None:
            log.info("the pending model after round %d is dropped: %s", self.pending.model.round, why)
            self.pending = None

    def _commit(self) -> None:
        assert self.pending is not None
        included = self.pending.included
        self.current, self.pending = self.pending.model, None
        log.info("model after round %d derived and kept (%s)", self.current.round, self.current.digest.hex()[:16])
        if self.path is not None:
            m = self.current
            state = {"run_id": self.run_id, "spec_digest": self.spec_digest.hex(), "round": m.round,
                     "digest": m.digest.hex(), "initial_digest": self.initial_digest.hex()}
            atomic_write_bytes(self.path, pack_tensors(m.params, m.velocity, state))
        if self.on_commit is not None:
            self.on_commit(self.current.round, included)

    def _resumed(self, initial: Params) -> Model | None:
        """The committed model on disk, if it is of this run and started from this ``W_0``."""
        if self.path is None or not self.path.exists():
            return None
        try:
            params, velocity, state = load_tensors(self.path)
        except (OSError, ValueError, KeyError) as exc:
            log.error("%s cannot be read (%s): starting again from W_0", self.path, exc)
            return None
        ours = (state.get("run_id"), state.get("spec_digest"), state.get("initial_digest")) == (
            self.run_id, self.spec_digest.hex(), self.initial_digest.hex())
        if not ours:
            return None  # another run's
        model = Model.of(int(state["round"]), params, velocity)
        same_layout = [(k, v.shape, v.dtype) for k, v in params.items()] == \
            [(k, v.shape, v.dtype) for k, v in initial.items()]
        if not same_layout or model.digest.hex() != state.get("digest"):
            log.error("%s does not hold the model it names: starting again from W_0", self.path)
            return None
        log.info("resuming this run's model after round %d from %s", model.round, self.path)
        return model
