"""The site's side of derived models (protocol/SPEC.md §6.9): its trajectory in the run, and every
check of a model the coordinator sends against it.

Sans-IO like the machine that holds it (``machine.py``): a check that fails raises
:class:`~asagiri.errors.Refusal` through the site's policy (rule ``derive_models``), and the
machine answers it with a ``Decline``.  The trajectory itself (``site/trajectory.py``) keeps the
committed model on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..causes import Rule
from ..config import RunSpec
from ..params import Params
from ..policy import SitePolicy
from ..secagg.binding import params_digest, spec_digest, vector_len
from ..secagg.client import ClientStateMachine
from ..secagg.history import RecordRefused, check_record
from ..secagg.verify import VerifiedSum
from ..site.control import OwnControl
from ..site.trajectory import Trajectory
from ..wire.crypto import blake2b
from ..wire.messages import EvaluateIns, ModelAt, SumRecord, Welcome

__all__ = ["DerivedModels"]

log = logging.getLogger(__name__)


class DerivedModels:
    def __init__(self, policy: SitePolicy, folder: Path | None) -> None:
        self.policy = policy
        self.folder = folder  # where each run's trajectory is kept (None: in memory only)
        self.trajectory: Trajectory | None = None  # kept across sessions of one run
        self.control: OwnControl | None = None  # SCAFFOLD's c_i, kept with the trajectory it follows
        self.active = False  # this run has the site derive its models

    def joined(self, welcome: Welcome, spec: RunSpec | None) -> None:
        """A Welcome was answered (``spec``: the run accepted, or None).  Another run's trajectory
        is let go: until this run's set-up ends, nothing is checked against the last run's models."""
        self.active = spec is not None and self.policy.derives_models(spec.secagg.enabled)
        t = self.trajectory
        if t is not None and (spec is None or not t.matches(welcome.run_id, spec_digest(welcome.spec))):
            self.trajectory = None

    @property
    def ready(self) -> bool:
        """Deriving, and set up: a model can be checked now."""
        return self.active and self.trajectory is not None

    def start(self, welcome: Welcome, spec: RunSpec, initial: Params) -> ModelAt | None:
        """Set-up ended with ``W_0`` as this site derives it: start (or go on with) the run's
        trajectory, and say where it stands, so the coordinator sends the sums it missed."""
        if not self.active:
            return None
        digest = spec_digest(welcome.spec)
        t = self.trajectory
        if t is None or not t.matches(welcome.run_id, digest):
            # one file per run: a detour through another run neither resets nor forgets this one's
            # (the whole hash: the coordinator picks run ids, and could search for two sharing a shorter name)
            name = blake2b(welcome.run_id.encode() + b"\0" + digest, person=b"asagiri-trajfile").hex()
            path = None if self.folder is None else self.folder / f"trajectory-{name}.npz"
            t = self.trajectory = Trajectory(run_id=welcome.run_id, spec_digest=digest, initial=initial,
                                             strategy=spec.strategy, path=path)
            self.control = None
            if spec.strategy.scaffold:
                own = None if path is None else path.with_name(f"control-{name}.npz")
                self.control = OwnControl(run_id=welcome.run_id, spec_digest=digest, template=initial, path=own)
                t.on_commit = self.control.committed
        return ModelAt(t.current.round, t.current.digest)

    def check_fit(self, rnd: int, attempt: int, digest: bytes) -> None:
        """A FitIns's model must be this site's own (a pending step it names is kept)."""
        t = self.trajectory
        assert t is not None
        self.policy.check_derived(f"FitIns {rnd}.{attempt}", digest, t.digests, t.current.round)
        t.train_on(digest)

    def check_evaluate(self, msg: EvaluateIns) -> None:
        """Evaluate only a model this site derived, each once per split (across restarts)."""
        if not self.active:
            return
        t = self.trajectory
        digest = params_digest(msg.params)
        self.policy.check_derived(f"EvaluateIns {msg.round} ({msg.split})", digest, None if t is None else t.digests,
                                  0 if t is None else t.current.round)
        assert t is not None  # check_derived refuses while there is none
        self.policy.require(t.evaluate(digest, msg.split), Rule.DERIVE_MODELS,
                            f"EvaluateIns {msg.round}: this model was evaluated on {msg.split} already")

    def server_control(self, digest: bytes) -> Params | None:
        """The optimiser state of the model ``digest`` names (SCAFFOLD's ``c`` among it), as this
        site derived it; None where it holds no such model or the model has none yet."""
        model = None if self.trajectory is None else self.trajectory.known(digest)
        return None if model is None else model.velocity

    def adopt(self, proven: VerifiedSum, site_id: int | None = None) -> None:
        """A sum this site verified becomes the pending step, if it was trained on a model it
        holds; ``site_id``: this site, when it may be among the sum's survivors."""
        t = self.trajectory
        if not self.ready or t is None:
            return
        if not t.verified(proven.round, proven.trained_on, proven.total, proven.digest, proven.plan,
                          len(proven.survivors), included=site_id in proven.survivors):
            log.warning("round %d: a verified sum on a model this site does not hold; not stepped to", proven.round)

    def sum_record(self, msg: SumRecord, secure: ClientStateMachine | None, run_id: str) -> None:
        """A round this site was not a survivor of: check its sum from the pinned keys, and step."""
        t = self.trajectory
        if not self.ready or t is None or secure is None:
            return  # nothing to derive from yet: the site says where it stands once set up
        # a round after the pending one builds on it; any round after the kept one may build on
        # the kept model (one the coordinator ran again, after a crash, in place of the pending)
        bases = [m for m in ((t.pending.model if t.pending is not None else None), t.current)
                 if m is not None and msg.round > m.round]
        problems = []
        for base in bases:
            try:
                proven = check_record(msg, run_id=run_id, secagg=secure.secagg, spec_digest=secure.spec_digest,
                                      trained_on=base.digest, peers=self.policy.peers, policy=self.policy,
                                      vector_len=vector_len(base.params, controls=t.strategy.scaffold))
            except RecordRefused as exc:
                problems.append(str(exc))
                continue
            self.adopt(proven)
            return
        if problems:
            log.warning("round %d.%d: the coordinator's sum record does not prove a step from this site's model, "
                        "ignored: %s", msg.round, msg.attempt, "; ".join(problems))

    def recorded(self, rnd: int, sum_blake3: object) -> None:
        """The coordinator's signed record of round ``rnd`` names the sum it kept."""
        if self.trajectory is not None and isinstance(sum_blake3, str):
            try:
                named = bytes.fromhex(sum_blake3)
            except ValueError:
                return
            self.trajectory.recorded(rnd, named)
