"""The federation driver: the round loop, with no networking.

It selects sites, runs each round attempt through the sans-IO :class:`RoundMachine` (and, under
secure aggregation, the coordinator's secure-aggregation machine), retries aborted attempts,
stops when too few sites can still train, scores the final model on the pooled test split, and
emits every step as a typed event (``observe.events``) to a recorder.  It reaches the sites only
through :class:`~asagiri.coordinator.sessions.Sessions`, which TCP sessions (``server.py``) and
in-memory ones (``asagiri.local``) feed alike.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from ..causes import Rule
from ..config import FederationConfig, RunSpec
from ..faults import NO_FAULTS, FaultPlan
from ..fsutil import atomic_write_bytes
from ..observe import events as ev
from ..observe.checkpoint import load_checkpoint
from ..observe.runlog import trim_jsonl
from ..observe.sums import SumHistory
from ..params import Params, params_digest
from ..secagg import binding
from ..secagg.rules import batch_map
from ..secagg.server import ServerStateMachine
from ..strategy.base import FitPlan, StrategyState, build_strategy
from ..strategy.selection import NotEnoughSites, usable_sites
from ..wire.crypto import PublicIdentity
from ..wire.messages import (
    Decline,
    EvaluateRes,
    FitRes,
    MaskedInput,
    Message,
    MessageError,
    ModelAt,
    RoundRecord,
    Welcome,
)
from .catchup import CatchUp
from .checks import check_federation
from .round import Outbound, ProtocolViolation, RoundMachine, RoundOutcome, SiteLost, TestEvaluation
from .sessions import Sessions

__all__ = ["FederationDriver", "FederationFailed", "ResumeError"]

log = logging.getLogger(__name__)


class FederationFailed(Exception):
    """The federation could not finish (for example a round failed ``max_round_attempts`` times)."""


class ResumeError(Exception):
    pass


def _declines(declined: dict[Rule, set[int]]) -> str:
    """What the sites declined a failed round by, and what fixes the commonest causes."""
    if not declined:
        return ""
    parts = [f"{rule} (sites {sorted(sites)}{'; ' + rule.fix if rule.fix else ''})"
             for rule, sites in sorted(declined.items())]
    return "; declined by " + ", ".join(parts)


def _stage(machine: RoundMachine) -> str:
    return "/".join(x for x in machine.stage_key if x)


class FederationDriver:
    """One federation run. ``emit`` receives every event (a :class:`~asagiri.observe.recorder.Recorder`).

    ``initial``: the round-0 global model (``asagiri.initial.initial_params``), built by the caller:
    the coordinator never loads model code."""

    def __init__(self, cfg: FederationConfig, sessions: Sessions, emit: Callable[[ev.Event], None], *,
                 initial: Params, checkpoint: Path, resume: bool = False, faults: FaultPlan = NO_FAULTS,
                 round_record: Callable[[], tuple[int, bytes] | None] = lambda: None,
                 abort_record: Callable[[], tuple[int, bytes] | None] = lambda: None) -> None:
        check_federation(cfg)
        self.cfg = cfg
        self.sessions = sessions
        self.emit = emit
        # The newest round's signed audit record (the recorder's), which every site is sent.
        self.round_record = round_record
        self.abort_record = abort_record
        self.faults = faults
        self.roster = {s.id: PublicIdentity.from_hex(s.public_key) for s in cfg.sites}
        # Every site gets the same spec; its digest is bound into each secure-aggregation round.
        self.spec = RunSpec.of(cfg).wire()
        self.spec_digest = binding.spec_digest(self.spec)
        self.batches = cfg.participation_batches()  # the spec's secagg.batches
        if self.batches is not None:
            log.info("participation batches: %s", self.batches)
            if len(self.batches) == 1 and len(self.roster) > cfg.min_clients:
                log.warning("one participation batch of all %d sites (secagg.batch_size=%s): every round needs every "
                            "site, and a missing one holds the rounds until it is back", len(self.roster),
                            cfg.secagg.batch_size)
        self.history: list[dict[str, Any]] = []
        self.withdrawn: dict[int, Rule] = {}  # sites that declined for good, and the rule each named
        self._test: dict[str, Any] = {}
        self.start_round = 1
        self._asked: tuple[int, int] = (0, 0)  # the newest round attempt begun: answers up to it may come late
        params = {k: v.copy() for k, v in initial.items()}  # the caller's arrays stay as they were
        self.model_bytes = sum(v.nbytes for v in params.values()) + 8
        self.strategy = build_strategy(cfg, params)
        self.checkpoint_path = checkpoint
        # The verified sums of recorded rounds: the sites derive the model from them (SPEC §6.9).
        self.sums = SumHistory(checkpoint.parent / "sums",
                               vector_len=binding.vector_len(params, controls=cfg.strategy.scaffold))
        self.catch_up = CatchUp(sessions, self.sums)
        self._attempts_path = checkpoint.parent / "attempt.json"  # the newest round attempt begun
        self.resumed = resume
        self._stage_s: dict[str, float] = {}  # the current round attempt's time per stage
        self._load_or_refuse(resume, params)

    def welcome(self, site_id: int) -> Welcome:
        return Welcome(self.cfg.run_id, self.cfg.site_index(site_id), len(self.cfg.sites), self.spec)

    # -- resume ----------------------------------------------------------------------------------

    def _attempts_begun(self, rnd: int) -> int:
        """How many attempts of round ``rnd`` an earlier process of this run began (0 if none)."""
        try:
            begun = json.loads(self._attempts_path.read_text())
        except (OSError, ValueError):
            return 0
        ok = isinstance(begun, dict) and begun.get("round") == rnd and type(begun.get("attempt")) is int
        return begun["attempt"] if ok else 0

    def _load_or_refuse(self, resume: bool, fresh: Params) -> None:
        path = self.checkpoint_path
        if not resume:
            if path.exists():
                raise ResumeError(f"{path} exists: continue it with --resume, or choose a new run_dir")
            self.sums.forget_after(0)  # a run that crashed before its first checkpoint
            return
        if not path.exists():
            raise ResumeError(f"--resume: no checkpoint at {path}")
        params, velocity, state = load_checkpoint(path)
        if {k: v.shape for k, v in params.items()} != {k: v.shape for k, v in fresh.items()}:
            raise ResumeError(f"{path}: its model does not match the configured model")
        if state.get("run_id") != self.cfg.run_id:
            raise ResumeError(f"{path}: belongs to run {state.get('run_id')!r}, not {self.cfg.run_id!r}")
        self.strategy.load_state(StrategyState(params, velocity))
        self.history = state["history"]
        # (checkpoints before the rule was kept name the sites only, as "exhausted")
        self.withdrawn = {int(s): Rule(r) for s, r in state.get("withdrawn", {}).items()} or \
            dict.fromkeys(state.get("exhausted", []), Rule.PRIVACY_BUDGET)
        self.start_round = int(state["round"]) + 1
        self.sums.forget_after(int(state["round"]))
        # The metrics log goes back to the checkpoint; the audit log is never rewritten: its
        # "run_started" record says which round the run resumed after.
        trim_jsonl(path.parent / "metrics.jsonl", max_round=int(state["round"]))
        log.info("resuming after round %d from %s", state["round"], path)

    # -- the run -----------------------------------------------------------------------------------

    @property
    def _model(self) -> Params:
        """The global model as the strategy holds it now."""
        return self.strategy.state().params

    def eligible(self) -> list[int]:
        return sorted(s for s in self.sessions.connected() if s not in self.withdrawn)

    def trainable(self) -> list[int]:
        """The eligible sites a round can sum: with participation batches, whole batches only."""
        return usable_sites(self.eligible(), self.batches)

    async def _wait_for_sites(self, needed: int, timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            while len(self.trainable()) < needed:
                await self._idle_until_changed()
            return True
        return len(self.trainable()) >= needed

    async def _idle_until_changed(self) -> None:
        """Answer what the sites send between rounds (a violation closes its channel at once)
        until a site joins or leaves."""
        async with anyio.create_task_group() as tg:
            async def changed() -> None:
                await self.sessions.changed()
                tg.cancel_scope.cancel()

            tg.start_soon(changed)
            while True:
                await self._handle_idle(*await self.sessions.receive())

    async def run(self) -> dict[str, Any]:
        """Run the federation; sites catching up on missed sums are served beside the rounds."""
        async with anyio.create_task_group() as background:
            self.catch_up.background = background
            try:
                return await self._rounds()
            finally:
                background.cancel_scope.cancel()

    async def _rounds(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.monotonic()
        if self.start_round > cfg.rounds:
            return self._end("completed", t_start)
        self.emit(ev.RunStarted(self.start_round, self.resumed, params_digest(self._model), spec=self.spec,
                                sites={str(s.id): s.public_key for s in cfg.sites}))
        # At start-up give every enrolled site a chance to join; later rounds go with whoever is there.
        await self._wait_for_sites(len(self.roster), cfg.timeouts.wait_for_sites)
        rnd = self.start_round
        while rnd <= cfg.rounds:
            # The round a crashed coordinator had begun (only ever the first one this process runs)
            # goes on with a new attempt number: the sites refuse a round attempt they entered
            # before (the replay rule, protocol/SPEC.md §7.2).
            first = 1 + (self._attempts_begun(rnd) if rnd == self.start_round else 0)
            declined: dict[Rule, set[int]] = {}  # this round's declines over its attempts, by rule
            for attempt in range(first, first + cfg.max_round_attempts):
                # with participation batches, a site gone for good takes its batch with it
                able = len(usable_sites(sorted(set(self.roster) - set(self.withdrawn)), self.batches))
                if able < cfg.min_clients:
                    # Sites leave for good when their privacy budget is spent, or when the run breaks
                    # their policy (a permanent Decline naming a policy rule, protocol/SPEC.md §7).
                    refused = self._refused()
                    log.warning("only %d sites can still train, min_clients=%d; ending (policy refusals: %s)",
                                able, cfg.min_clients, refused or "none")
                    why = "refused the run by their policy or spent their privacy budget" if refused else \
                        "spent their privacy budget"
                    return self._end("refused_by_sites" if refused else "budget_exhausted", t_start, message=(
                        f"federation ends before round {rnd}: sites {sorted(self.withdrawn)} {why}; fewer than "
                        f"min_clients={cfg.min_clients} can train"))
                if not await self._wait_for_sites(cfg.min_clients, cfg.timeouts.wait_for_sites):
                    self._fail(rnd, f"only {len(self.trainable())} eligible sites connected in whole participation "
                                    f"batches, min_clients={cfg.min_clients}", t_start)
                await self._drain_idle_events()
                t0 = time.monotonic()
                try:
                    outcome = await self._run_round(rnd, attempt)
                except NotEnoughSites as exc:
                    self._fail(rnd, str(exc), t_start)
                self.withdrawn.update({s: outcome.declined[s] for s in outcome.withdrawn})
                for site, rule in outcome.declined.items():
                    declined.setdefault(rule, set()).add(site)
                if outcome.abort_reason is None:
                    if outcome.sum_record is not None:
                        self.sums.keep(outcome.sum_record)  # before the checkpoint commits the round
                    self._complete_round(outcome, time.monotonic() - t0)
                    await self.catch_up.send_sum_record(outcome)
                    await self._send_round_record()
                    break
                assert outcome.abort_cause is not None
                self.emit(ev.RoundAborted(rnd, attempt, outcome.abort_cause, outcome.abort_reason, outcome.selected,
                                          outcome.participants, outcome.dropped))
                await self._send_abort_record(outcome.selected)
            else:
                self._fail(rnd, f"aborted {cfg.max_round_attempts} times" + _declines(declined), t_start)
            self.faults.reached("round_done", rnd)
            rnd += 1
        self._test = await self._final_test(cfg.rounds)
        return self._end("completed", t_start)

    # -- one round attempt -----------------------------------------------------------------------

    async def _handle_idle(self, site_id: int, event: Message | SiteLost) -> None:
        """Between rounds only late answers (to a round attempt already begun) and a site's
        ``ModelAt`` are acceptable; anything else, an answer to a round never asked included, is a
        violation."""
        if isinstance(event, SiteLost):
            return
        if isinstance(event, ModelAt):
            await self.catch_up.answer(site_id, event)
            return
        if isinstance(event, FitRes | Decline) and (event.round, event.attempt) <= self._asked:
            return
        if isinstance(event, EvaluateRes) and event.round <= self._asked[0]:
            return
        self.sessions.metrics.protocol_violations.labels("out_of_round").inc()
        log.warning("site %d: %s outside a round, closing its channel", site_id, type(event).__name__)
        self.sessions.drop(site_id)

    async def _drain_idle_events(self) -> None:
        while (item := self.sessions.receive_nowait()) is not None:
            await self._handle_idle(*item)

    async def _round_event(self) -> tuple[int, Message | SiteLost]:
        """The next event for a round: a site's ``ModelAt`` is answered here, whatever the stage."""
        while True:
            site_id, event = await self.sessions.receive()
            if not isinstance(event, ModelAt):
                return site_id, event
            await self.catch_up.answer(site_id, event)

    async def _run_round(self, rnd: int, attempt: int) -> RoundOutcome:
        t_stage = time.monotonic()
        plan = self.strategy.configure_fit(rnd, attempt, self.eligible())
        evaluators = self.strategy.configure_evaluate(rnd, self.eligible())
        secagg = self._secagg_machine(rnd, attempt, plan)
        machine = RoundMachine(
            rnd=rnd, attempt=attempt, selected=plan.sites, evaluators=evaluators,
            min_clients=self.cfg.min_clients, global_params=self._model,
            fit_config=plan.config, strategy=self.strategy, secagg=secagg,
            max_update_norm=self.cfg.train.max_update_norm, controls=self.cfg.strategy.scaffold,
        )
        atomic_write_bytes(self._attempts_path, json.dumps({"round": rnd, "attempt": attempt}).encode())
        self._asked = max(self._asked, (rnd, attempt))
        self.emit(ev.RoundStarted(rnd, attempt, plan.sites, secagg is not None))
        self._stage_s = {"selection": time.monotonic() - t_stage}
        await self.sessions.send(machine.start())
        t = self.cfg.timeouts
        timeouts = {"fit": t.fit, "secagg": t.secagg_stage, "evaluate": t.evaluate}
        while not machine.finished:
            stage, name, t_stage = machine.stage_key, _stage(machine), time.monotonic()
            self.emit(ev.StageStarted(rnd, attempt, name))
            self.faults.reached(name, rnd)
            with anyio.move_on_after(timeouts[machine.deadline_kind]) as scope:
                while machine.stage_key == stage and not machine.finished:
                    site_id, event = await self._round_event()
                    await self.sessions.send(self._step(machine, site_id, event, rnd, attempt))
            self._stage_s[name] = self._stage_s.get(name, 0.0) + time.monotonic() - t_stage
            if scope.cancelled_caught and machine.stage_key == stage:
                log.warning("round %d: stage %s timed out", rnd, name)
                await self.sessions.send(machine.timed_out())
        return machine.outcome

    def _step(self, machine: RoundMachine, site_id: int, event: Message | SiteLost, rnd: int,
              attempt: int) -> list[Outbound]:
        if isinstance(event, SiteLost):
            self.emit(ev.SiteDropped(rnd, attempt, site_id, event.reason, _stage(machine)))
            return machine.site_lost(site_id)
        try:
            out = machine.receive(site_id, event)
            # Reported only once the round accepted it: a site cannot write refusals or updates
            # into the records by sending what the round does not allow.
            if isinstance(event, FitRes | MaskedInput) and (event.round, event.attempt) == (rnd, attempt):
                self.emit(ev.UpdateReceived(rnd, attempt, site_id))
            elif isinstance(event, Decline) and (event.round, event.attempt) == (rnd, attempt):
                self.emit(ev.SiteRefused(rnd, attempt, site_id, event.rule, event.permanent))
        except ProtocolViolation as exc:
            self.sessions.metrics.protocol_violations.labels("round").inc()
            log.warning("%s; closing its channel", exc)
            self.sessions.drop(site_id)
            self.emit(ev.SiteDropped(rnd, attempt, site_id, f"protocol violation: {exc.reason}", _stage(machine)))
            out = machine.site_lost(site_id)
        self.sessions.release(site_id, event)
        return out

    def _secagg_machine(self, rnd: int, attempt: int, plan: FitPlan) -> ServerStateMachine | None:
        sa = self.cfg.secagg
        if not sa.enabled:
            return None
        params = binding.RoundParams.derive(
            run_id=self.cfg.run_id, round=rnd, attempt=attempt, participants=plan.sites, secagg=sa,
            params_digest=binding.params_digest(self._model), fit_config=plan.config,
            vector_len=binding.vector_len(self._model, controls=self.cfg.strategy.scaffold),
            spec_digest=self.spec_digest,
        )
        return ServerStateMachine(params=params, min_clients=self.cfg.min_clients, identities=self.roster,
                                  batches=batch_map(self.batches))

    async def _final_test(self, rnd: int) -> dict[str, Any]:
        """Score the final model on the official test split, predictions pooled over the sites."""
        sites = self.eligible()
        if not sites:
            return {}
        machine = TestEvaluation(rnd=rnd, sites=sites, params=self._model)
        await self._drain_idle_events()
        await self.sessions.send(machine.start())
        with anyio.move_on_after(self.cfg.timeouts.evaluate):
            while not machine.finished:
                site_id, event = await self._round_event()
                if isinstance(event, SiteLost):
                    machine.site_lost(site_id)
                    continue
                try:
                    machine.receive(site_id, event)
                except ProtocolViolation as exc:
                    log.warning("%s; closing its channel", exc)
                    self.sessions.drop(site_id)
                    machine.site_lost(site_id)
        machine.timed_out()
        pooled = machine.pooled()
        if self.cfg.strategy.fedbn and pooled:
            # each site scored with its own normalisation layers: a personalised model per site, whose
            # scores sit on the site's own scale; the per-site AUCs say how each does, the pooled one less
            pooled["personalised"] = True
        self.emit(ev.TestScored(rnd, pooled))
        return pooled

    # -- records -----------------------------------------------------------------------------------

    def _complete_round(self, outcome: RoundOutcome, duration: float) -> None:
        assert outcome.params is not None
        evaluation = outcome.evaluation
        record: dict[str, Any] = {
            "round": outcome.round,
            "attempt": outcome.attempt,
            "selected": outcome.selected,
            "participants": outcome.participants,
            "dropped": outcome.dropped,
            "declined": {str(k): v for k, v in outcome.declined.items()},
            "duration_s": round(duration, 3),
            "stage_s": {k: round(v, 4) for k, v in self._stage_s.items()},
        }
        for key in ("auc", "accuracy", "loss"):
            if key in evaluation:
                record[key] = evaluation[key]
                record[f"site_{key}"] = evaluation[f"site_{key}"]
        if "site_auc_undefined" in evaluation:
            record["site_auc_undefined"] = evaluation["site_auc_undefined"]
        record["secure_aggregation"] = outcome.secagg_stages is not None
        if outcome.secagg_stages is not None:
            record["secagg_stages"] = outcome.secagg_stages
        if outcome.sum_digest is not None:
            record["sum_blake3"] = outcome.sum_digest.hex()
        for key in ("epsilon", "noise_multiplier"):
            values = {str(s): m[key] for s, m in sorted(outcome.site_eval.items()) if key in m}
            if values:
                record[key] = values
        if budget := [s for s in sorted(outcome.withdrawn) if not outcome.declined[s].is_policy]:
            record["exhausted"] = budget
        if refused := {str(s): str(outcome.declined[s]) for s in sorted(outcome.withdrawn)
                       if outcome.declined[s].is_policy}:
            record["refused"] = refused
        train_loss = {str(s): m["train_loss"] for s, m in outcome.site_metrics.items() if "train_loss" in m}
        if train_loss:
            record["site_train_loss"] = train_loss
        self.history.append(record)
        state = {"run_id": self.cfg.run_id, "round": outcome.round, "history": self.history,
                 "withdrawn": {str(s): str(r) for s, r in sorted(self.withdrawn.items())}}
        self.emit(ev.RoundCompleted(record, outcome.params, self.strategy.state().velocity, state))

    def round_record_message(self) -> RoundRecord | None:
        """The newest round's signed record as the sites are sent it (protocol/SPEC.md §9), or None:
        no round completed yet, or a record past the message bound (the sites then decline the next
        round, rule record)."""
        latest = self.round_record()
        if latest is None:
            return None
        try:
            return RoundRecord(*latest)
        except MessageError as exc:
            log.error("round %d: its record cannot be sent (%s)", latest[0], exc)
            return None

    async def _send_round_record(self) -> None:
        """Every site gets the round's signed record before anything of the next round: the site
        checks it and keeps it as its receipt."""
        if (msg := self.round_record_message()) is not None:
            await self.sessions.send([Outbound(s, msg) for s in sorted(self.sessions.connected())])

    async def _send_abort_record(self, selected: list[int]) -> None:
        """The aborted attempt's signed record, to the sites asked to train in it: a site that
        revealed its shares before the abort then holds the coordinator's signed word of it, and
        does not count it as a sum taken without a record (protocol/SPEC.md §9.3)."""
        latest = self.abort_record()
        if latest is None:
            return
        try:
            msg = RoundRecord(*latest)
        except MessageError as exc:
            log.error("round %d: its abort record cannot be sent (%s)", latest[0], exc)
            return
        connected = set(self.sessions.connected())
        await self.sessions.send([Outbound(s, msg) for s in sorted(connected & set(selected))])

    def _fail(self, rnd: int, reason: str, t_start: float) -> None:
        log.error("federation stopped at round %d: %s", rnd, reason)
        message = f"federation failed at round {rnd}: {reason}"
        self._end("failed", t_start, reason=reason, message=message)
        raise FederationFailed(message)

    def _latest(self, key: str) -> dict[str, float]:
        """Each site's most recent value of a per-site metric (a site may miss later rounds)."""
        out: dict[str, float] = {}
        for record in self.history:
            out.update(record.get(key, {}))
        return dict(sorted(out.items()))

    def _refused(self) -> dict[str, str]:
        return {str(s): str(r) for s, r in sorted(self.withdrawn.items()) if r.is_policy}

    def _end(self, status: str, t_start: float, *, reason: str | None = None, message: str = "") -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        summary: dict[str, Any] = {
            "run_id": self.cfg.run_id,
            "status": status,
            "rounds_planned": self.cfg.rounds,
            "rounds_completed": len(self.history),
            "final": {k: last[k] for k in ("auc", "accuracy", "loss", "site_auc", "site_accuracy") if k in last},
            "epsilon": self._latest("epsilon"),
            "noise_multiplier": self._latest("noise_multiplier"),
            # a site whose privacy budget is spent, and apart from it, one that refused the run
            # by its policy with its rule (a missing data file is `setup`, never a spent budget)
            "exhausted": sorted(s for s, r in self.withdrawn.items() if not r.is_policy),
            "refused": self._refused(),
            "wall_s": round(time.monotonic() - t_start, 3),
            "mean_round_s": round(sum(h["duration_s"] for h in self.history) / len(self.history), 3)
            if self.history else None,
            "model_sha256": params_digest(self._model),
            **self._test,
        }
        if reason:
            summary["reason"] = reason
        if message:
            summary["message"] = message
        self.emit(ev.FederationEnded(status, summary, message))
        return summary
