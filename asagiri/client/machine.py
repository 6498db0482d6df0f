"""The site's round logic as one sans-IO machine: events in, actions out.

No sockets, no clocks, no torch.  The session (``session.py``) is a pump: it feeds the machine
what the coordinator sends (:meth:`SiteMachine.receive`) and what the training thread finishes
(:meth:`set_up`, :meth:`trained`, :meth:`evaluated`, :meth:`budget_spent`), and carries out the
actions it returns: :class:`Send` a message, :class:`SetUp` the site's worker, :class:`Train` or
:class:`Evaluate` in the training thread, :class:`End` the session.

Every piece of per-round state lives here or in the two machines it holds and drives:

- what the site was asked and agreed to: the newest ``FitIns`` it accepted (older ones are never
  trained on), the round attempts it declined (it answers nothing more in them, reconnected or
  not), the ``SecAggStart`` rounds it entered;
- what it sent and signed, and what record it expects: the :class:`~asagiri.site.receipts.RoundWitness`,
  fed at each of those moments;
- the secure-aggregation round: :class:`~asagiri.secagg.client.ClientStateMachine`.

Every refusal goes through the site's :class:`~asagiri.policy.SitePolicy` and comes back as a
:class:`~asagiri.errors.Refusal`; this machine turns it into a ``Decline`` naming the rule.  A
message that breaks the protocol raises :class:`~asagiri.wire.errors.RemoteProtocolError`, which
the session turns into a closed channel.  The witness and the replay guard keep their records on
disk (an append, an atomic write); that is their job, and nothing here waits on the network.

Training leaves the machine as an action, so a slow training never keeps it from reading: an
update that finishes before its round's ``SecAggStart`` arrived is held until it does, and one
whose round moved on is dropped.  No timer is involved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..causes import Rule
from ..config import RunSpec
from ..errors import Refusal
from ..params import Params, params_digest
from ..policy import SitePolicy
from ..secagg.binding import spec_digest
from ..secagg.client import ClientStateMachine
from ..secagg.replay import ReplayGuard
from ..site.receipts import RoundWitness
from ..wire.crypto import Identity
from ..wire.errors import RemoteProtocolError
from ..wire.messages import (
    ConsistencyCheck,
    ConsistencySig,
    Decline,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    KeyRoster,
    MaskedInput,
    Message,
    RoundAborted,
    RoundRecord,
    SecAggStart,
    ShareDelivery,
    Shutdown,
    SumAnnounce,
    SumProof,
    SumRecord,
    UnmaskRequest,
    UnmaskResponse,
    Welcome,
)
from .derived import DerivedModels

__all__ = ["Action", "End", "Evaluate", "Send", "SetUp", "SiteMachine", "Train", "Unreleased"]

log = logging.getLogger(__name__)

SECAGG_TO_SITE = (SecAggStart, KeyRoster, ShareDelivery, ConsistencyCheck, UnmaskRequest, SumAnnounce, SumProof)


@dataclass(frozen=True, slots=True)
class Send:
    msg: Message


@dataclass(frozen=True, slots=True)
class SetUp:
    """Build the site's worker (data, model, ledger) for this run; answer with :meth:`SiteMachine.set_up`."""

    welcome: Welcome
    spec: RunSpec


@dataclass(frozen=True, slots=True)
class Train:
    """Train on ``ins``; answer with :meth:`SiteMachine.trained` (or :meth:`SiteMachine.budget_spent`).
    ``secure``: the update goes into secure aggregation, so the pump hands back the delta."""

    ins: FitIns
    secure: bool


@dataclass(frozen=True, slots=True)
class Evaluate:
    ins: EvaluateIns


@dataclass(frozen=True, slots=True)
class Unreleased:
    """The update trained for ``round`` will never leave the site (its round moved on, was
    aborted or declined before it was masked): the privacy it was charged is given back."""

    round: int


@dataclass(frozen=True, slots=True)
class End:
    """The coordinator ended the session (``final``: the federation is over)."""

    final: bool


Action = Send | SetUp | Train | Evaluate | Unreleased | End


@dataclass
class _Held:
    """A trained update whose round's SecAggStart had not arrived yet."""

    ins: FitIns
    delta: np.ndarray
    num_samples: int


class SiteMachine:
    """One site's side of the rounds, across its sessions and runs."""

    def __init__(self, *, site_id: int, identity: Identity, policy: SitePolicy, replay: ReplayGuard,
                 witness: RoundWitness, trajectory_dir: Path | None = None) -> None:
        self.site_id = site_id
        self.identity = identity
        self.policy = policy
        self.replay = replay
        self.witness = witness
        self.run_id = ""
        self.spec: RunSpec | None = None
        self.refusal: Refusal | None = None  # set when this site refuses the whole run
        self.secagg: ClientStateMachine | None = None
        self._untrained: tuple[int, int] | None = None  # the round attempt agreed to and not yet trained
        self._latest_fit: tuple[int, int] = (0, 0)  # only the newest accepted FitIns is trained on
        self._latest_binding: tuple[bytes, dict] | None = None  # what the machine bound of it on accepting it
        self._declined: set[tuple[str, int, int]] = set()
        self._started: set[tuple[int, int]] = set()  # SecAggStart received, this session
        self._held: _Held | None = None
        # The run's models as this site derives them (policy.derive_models), kept across sessions.
        self.models = DerivedModels(policy, trajectory_dir)

    # -- a session begins ------------------------------------------------------------------------

    def welcome(self, msg: Welcome) -> list[Action]:
        """A new session's Welcome: accept the run, or refuse it.  An accepted run is set up in the
        training thread (the pump keeps a worker built for the same run) while the machine goes on:
        the protocol's own steps (key set-up, records) need no data, only training waits for it."""
        self.run_id, self.refusal, self.spec = msg.run_id, None, None
        self._started.clear()
        dropped = self._unhold()
        self._untrained = None
        try:
            self.spec = self.policy.check_run(msg.run_id, msg.spec)
            self.policy.check_batches(self.spec, self.site_id)
        except Refusal as exc:
            return dropped + self._refuse_run(exc)
        self._joined(msg)
        return [*dropped, SetUp(msg, self.spec)]

    def set_up(self, welcome: Welcome, problem: str | None, *, examples: int = 0,
               initial: Params | None = None) -> list[Action]:
        """The worker for ``welcome`` is built with ``examples`` training examples and the run's
        ``W_0`` as this site derives it (``initial``), or could not be (``problem``: why, for the
        log).  A set-up that failed, or a training set below the policy's floor, takes the site out
        of the run for good, declining the round it had already agreed to train."""
        try:
            if problem is not None:
                self.policy.refuse(Rule.SETUP, f"the run cannot be set up at this site: {problem}")
            self.policy.check_examples(examples)
        except Refusal as exc:
            out = [] if self._untrained is None else self._decline(*self._untrained, exc.rule, permanent=True)
            return out + self._refuse_run(exc)
        return self._derive(welcome, initial)

    def _derive(self, welcome: Welcome, initial: Params | None) -> list[Action]:
        """Start (or go on with) this run's trajectory (SPEC §6.9); check the FitIns accepted
        while setting up; say where the site stands, so the coordinator sends the sums it missed."""
        if self.spec is None or initial is None or (at := self.models.start(welcome, self.spec, initial)) is None:
            return []
        out: list[Action] = []
        if self._untrained is not None and self._untrained == self._latest_fit and self._latest_binding is not None:
            out += self._check_model(*self._untrained, self._latest_binding[0])
        return [*out, Send(at)]

    def _check_model(self, rnd: int, attempt: int, digest: bytes) -> list[Action]:
        try:
            self.models.check_fit(rnd, attempt, digest)
        except Refusal as exc:
            return self._decline(rnd, attempt, exc.rule, permanent=False)
        return []

    def _evaluate(self, msg: EvaluateIns) -> list[Action]:
        try:
            self.models.check_evaluate(msg)
        except Refusal as exc:
            return [Send(Decline(msg.round, 0, exc.rule, False))]
        return [Evaluate(msg)]

    def _joined(self, welcome: Welcome) -> None:
        spec = self.spec
        assert spec is not None
        log.info("joined run %s", welcome.run_id)  # Welcome's site_index and num_sites change nothing here
        if not spec.secagg.enabled:
            self.secagg = None
        else:  # one machine per run, kept across sessions: it remembers the rounds it entered
            digest = spec_digest(welcome.spec)
            old = self.secagg
            if old is None or old.run_id != welcome.run_id or old.spec_digest != digest:
                self.secagg = ClientStateMachine(
                    site_id=self.site_id, identity=self.identity, run_id=welcome.run_id, secagg=spec.secagg,
                    spec_digest=digest, policy=self.policy, replay=self.replay, controls=spec.strategy.scaffold,
                )
        self.witness.joined(welcome.run_id)
        self.models.joined(welcome, spec)

    def _refuse_run(self, exc: Refusal) -> list[Action]:
        self.refusal, self.spec = exc, None
        self.models.active = False
        log.error("this site will not take part in run %s: %s", self.run_id, exc)
        return []

    @property
    def ready(self) -> bool:
        """The run is accepted this session (its set-up may still be running: a training waits for it)."""
        return self.spec is not None

    # -- what the coordinator sends --------------------------------------------------------------

    def receive(self, msg: Message) -> list[Action]:
        if isinstance(msg, Shutdown):
            return self._shutdown(msg)
        if not self.ready:
            return self._receive_refused(msg)
        if not isinstance(msg, RoundRecord | SumRecord):  # a sum's record says nothing of the round records
            self.witness.settle(self.run_id)
        if isinstance(msg, FitIns):
            return self._fit(msg)
        if isinstance(msg, SECAGG_TO_SITE):
            return self._secagg(msg)
        if isinstance(msg, EvaluateIns):
            return self._evaluate(msg)
        if isinstance(msg, SumRecord):
            self.models.sum_record(msg, self.secagg, self.run_id)
            return []
        if isinstance(msg, RoundRecord):
            try:
                rec = self.witness.record(self.run_id, msg)
            except Refusal:
                return []  # logged and kept as evidence; every later FitIns of this run is declined for good
            if rec is not None:
                self.models.recorded(msg.round, rec.get("sum_blake3"))
            return []
        if isinstance(msg, RoundAborted):
            log.warning("round %d attempt %d aborted (%s): %s", msg.round, msg.attempt, msg.cause, msg.detail)
            self.witness.aborted(self.run_id, msg.round, msg.attempt)
            return self._unhold((msg.round, msg.attempt))
        raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the coordinator")

    def _receive_refused(self, msg: Message) -> list[Action]:
        """The run breaks this site's policy: decline every round for good, and do nothing else."""
        if self.refusal is None:
            raise RemoteProtocolError(f"{type(msg).__name__} before a Welcome")
        if isinstance(msg, FitIns):
            return self._decline(msg.round, msg.attempt, self.refusal.rule, permanent=True)
        if isinstance(msg, (*SECAGG_TO_SITE, RoundAborted, RoundRecord, SumRecord)):
            return []  # nothing to answer: this site is in no round
        raise RemoteProtocolError(f"{type(msg).__name__} for a site that refused the run ({self.refusal})")

    def _shutdown(self, msg: Shutdown) -> list[Action]:
        log.info("coordinator says: %s", msg.reason)
        if msg.final and self.ready and (missing := self.witness.pending_round(self.run_id)) is not None:
            log.error("the federation ended without the coordinator's signed record of round %d, whose model "
                      "this site evaluated: this site holds no receipt of it", missing)
        return [End(msg.final)]

    def _fit(self, msg: FitIns) -> list[Action]:
        try:
            self.policy.check_fit_config(msg.config)
            self.witness.before_fit(self.run_id, msg.round, msg.attempt)
        except Refusal as exc:
            return self._decline(msg.round, msg.attempt, exc.rule, permanent=self.witness.disputed(self.run_id))
        self.witness.asked(self.run_id, msg.round, msg.attempt)
        secure = self.secagg
        if secure is None:
            # in the clear too, only the newest FitIns is trained on: an older one still waiting
            # gives its tensors back (a coordinator cannot pile models up in the site's memory)
            self._latest_fit = max(self._latest_fit, (msg.round, msg.attempt))
            self._untrained = (msg.round, msg.attempt)
            return [Train(msg, secure=False)]
        # Key set-up messages keep flowing while the site trains; the update is masked when ready.
        try:
            replies = secure.receive(msg)
        except Refusal as exc:
            return self._decline(msg.round, msg.attempt, exc.rule, permanent=False)
        binding_ = secure.fit_binding
        assert binding_ is not None  # the FitIns was just accepted
        if self.models.ready and (declined := self._check_model(msg.round, msg.attempt, binding_[0])):
            return declined
        self._latest_fit, self._latest_binding = (msg.round, msg.attempt), binding_
        dropped = self._unhold()  # superseded: given back before the next training is charged
        self._untrained = (msg.round, msg.attempt)
        return [*dropped, *self._sent(replies, msg), Train(msg, secure=True)]

    def _secagg(self, msg: Message) -> list[Action]:
        secure = self.secagg
        if secure is None:
            raise RemoteProtocolError("secure-aggregation message, but this run has it off")
        key = (msg.round, msg.attempt)  # type: ignore[attr-defined]
        if self._is_declined(*key):
            return []  # this site declined that round attempt: it says nothing more in it
        try:
            replies = secure.receive(msg)
        except Refusal as exc:
            if isinstance(msg, SumProof):  # a proof out of order, or one the sum fails: only the coordinator sends it
                self.witness.false_sum(self.run_id, msg.round, str(exc))
                return []
            return self._decline(*key, exc.rule, permanent=False)
        out = self._sent(replies, msg)
        if isinstance(msg, SecAggStart):
            self._started.add(key)
            if self._held is not None and (self._held.ins.round, self._held.ins.attempt) == key:
                held, self._held = self._held, None
                out += self._mask(held)
        return out

    def _sent(self, replies: list[Message], about: Message) -> list[Action]:
        """The secure-aggregation machine's replies, as sends, with what they mean for the record."""
        for reply in replies:
            if isinstance(reply, MaskedInput):
                self.witness.sent_update(self.run_id, reply.round, reply.attempt)
            elif isinstance(reply, ConsistencySig) and isinstance(about, ConsistencyCheck):
                self.witness.signed_survivors(self.run_id, reply.round, reply.attempt, list(about.survivors))
            elif isinstance(reply, UnmaskResponse):
                self.witness.unmasked(self.run_id, reply.round, reply.attempt)
        if isinstance(about, SumProof) and (proven := self.secagg.verified if self.secagg else None) is not None \
                and (proven.round, proven.attempt) == (about.round, about.attempt):
            self.witness.verified(self.run_id, about.round, about.attempt, proven.digest)
            self.models.adopt(proven, self.site_id)
        return [Send(r) for r in replies]

    # -- what the training thread finishes -------------------------------------------------------

    def wants(self, ins: FitIns) -> bool:
        """Whether ``ins`` is still to be trained (not declined, and not superseded by a newer one)."""
        if self._is_declined(ins.round, ins.attempt):
            return False
        return (ins.round, ins.attempt) == self._latest_fit

    def trained(self, ins: FitIns, result: FitRes | tuple[np.ndarray, int]) -> list[Action]:
        """Training on ``ins`` finished: a plaintext update, or (secure) the flat delta and the sample count."""
        if self._untrained == (ins.round, ins.attempt):
            self._untrained = None
        if isinstance(result, FitRes):
            self.witness.sent_update(self.run_id, ins.round, ins.attempt)
            return [Send(result)]
        delta, num_samples = result
        key = (ins.round, ins.attempt)
        if self._is_declined(*key) or key != self._latest_fit:
            return [Unreleased(ins.round)]
        held = _Held(ins, delta, self.policy.count_sent(num_samples))
        if key not in self._started:
            self._held = held  # the round's SecAggStart follows FitIns: mask when it comes
            return []
        return self._mask(held)

    def _mask(self, held: _Held) -> list[Action]:
        secure, ins = self.secagg, held.ins
        assert secure is not None
        if secure.round_key != (ins.round, ins.attempt):
            log.warning("round %d.%d moved on while training; update discarded", ins.round, ins.attempt)
            return [Unreleased(ins.round)]
        try:
            assert self._latest_binding is not None  # bound when its FitIns was accepted
            replies = secure.set_input(held.delta, held.num_samples, trained_on=self._latest_binding)
        except Refusal as exc:
            return [Unreleased(ins.round), *self._decline(ins.round, ins.attempt, exc.rule, permanent=False)]
        if secure.clipped:
            log.info("secure aggregation: %d update values were clipped", secure.clipped)
        return self._sent(replies, ins)

    def budget_spent(self, ins: FitIns) -> list[Action]:
        """The site's privacy budget cannot pay for ``ins``: it leaves the run for good."""
        return self._decline(ins.round, ins.attempt, Rule.PRIVACY_BUDGET, permanent=True)

    def evaluated(self, ins: EvaluateIns, res: EvaluateRes) -> list[Action]:
        if ins.split == "val":  # the round's new global model: its record must name this digest
            self.witness.evaluated(self.run_id, ins.round, params_digest(ins.params), res.metrics)
        return [Send(res)]

    # -- declining -------------------------------------------------------------------------------

    def _decline(self, rnd: int, attempt: int, rule: Rule, *, permanent: bool) -> list[Action]:
        """One Decline per round attempt, naming the rule only; the detail is in this site's log."""
        if self._is_declined(rnd, attempt):
            return []
        self._declined.add((self.run_id, rnd, attempt))
        if self.ready:
            self.witness.declined(self.run_id, rnd, attempt)
        dropped = self._unhold((rnd, attempt))
        log.warning("round %d.%d: declining (%s)", rnd, attempt, rule)
        return [*dropped, Send(Decline(rnd, attempt, rule, permanent))]

    def _unhold(self, key: tuple[int, int] | None = None) -> list[Action]:
        """Drop the update held for its round's SecAggStart (any, or only round attempt ``key``'s):
        it never left the site, so its privacy charge is given back."""
        held = self._held
        if held is None or (key is not None and (held.ins.round, held.ins.attempt) != key):
            return []
        self._held = None
        return [Unreleased(held.ins.round)]

    def _is_declined(self, rnd: int, attempt: int) -> bool:
        return (self.run_id, rnd, attempt) in self._declined

