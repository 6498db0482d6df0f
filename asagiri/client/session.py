"""One session of a site with the coordinator: train and evaluate on request, take part in
secure aggregation, and check the coordinator's round records.

One task group per session: ``_reader`` owns the connection's receive side (heartbeats and the
idle timeout), ``_heartbeat`` keeps the coordinator informed while we train, and ``_worker``
handles requests one at a time.  Training and evaluation leave the event loop through
``anyio.to_thread.run_sync``, the only thread.  The model, the site's data and its local
(FedBN) layers live in :class:`~asagiri.site.SiteWorker`, which survives reconnects. What the site
will take part in is decided by its :class:`~asagiri.policy.SitePolicy`; a refusal is answered with
``Decline``, so the coordinator counts the site out and the federation goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..config import RunSpec, SiteConfig, TimeoutsConfig
from ..faults import FaultPlan
from ..params import flatten, params_digest
from ..policy import Refusal, SitePolicy
from ..secagg.binding import spec_digest
from ..secagg.client import ClientStateMachine
from ..site.metrics import SiteMetrics
from ..site.receipts import RoundWitness
from ..site.worker import BudgetExhausted, SiteWorker
from ..train.loop import OnStep
from ..wire.connection import Connection
from ..wire.crypto import Identity
from ..wire.errors import ConnectionLost, RemoteProtocolError
from ..wire.messages import (
    ConsistencyCheck,
    ConsistencySig,
    Decline,
    EvaluateIns,
    FitIns,
    Heartbeat,
    KeyRoster,
    MaskedInput,
    Message,
    RoundAborted,
    RoundRecord,
    SecAggStart,
    ShareDelivery,
    Shutdown,
    UnmaskRequest,
    Welcome,
)
from .progress import TrainingProgress
from .state import PersistentReplayGuard

SECAGG_TO_SITE = (SecAggStart, KeyRoster, ShareDelivery, ConsistencyCheck, UnmaskRequest)

__all__ = ["Kept", "Session"]

log = logging.getLogger(__name__)


@dataclass
class Kept:
    """What a site keeps across reconnects: its worker (data, model, local layers, ledger) and the
    run's secure-aggregation machine, which remembers its rounds."""

    policy: SitePolicy
    replay: PersistentReplayGuard
    # The coordinator's signed record of each round, checked and kept as this site's receipt.
    witness: RoundWitness
    metrics: SiteMetrics
    progress: TrainingProgress | None = None  # a bar of local training, on a terminal only
    worker: SiteWorker | None = None
    secagg: ClientStateMachine | None = None
    # One training at a time on the one model: a round refused or aborted early must not start
    # the next attempt's training while its own thread still runs.
    training: anyio.Lock = field(default_factory=anyio.Lock)
    latest_fit: tuple[int, int] = (0, 0)  # only the newest FitIns is trained on; older queued ones are dropped
    # Round attempts this site declined, per run: it answers nothing more in them, reconnected or not.
    declined: set[tuple[str, int, int]] = field(default_factory=set)


# Headroom over the model's own size for a message's header and bookkeeping.
PAYLOAD_MARGIN = 1 << 20


class Session:
    def __init__(self, cfg: SiteConfig, conn: Connection, kept: Kept, faults: FaultPlan, identity: Identity):
        self.cfg = cfg
        self.identity = identity
        self.conn = conn
        self.kept = kept
        self.faults = faults
        self.final = False
        self._ended = False
        self.refusal: Refusal | None = None  # set when this site refuses the whole run
        self.run_id = ""
        self._round_started: dict[tuple[int, int], anyio.Event] = {}
        # Until the Welcome's spec says otherwise (and for a run this site refuses): the config's defaults.
        self._stage_timeout = TimeoutsConfig().secagg_stage

    async def run(self) -> None:
        first = await self.conn.receive()
        if not isinstance(first, Welcome):
            raise RemoteProtocolError(f"expected Welcome, got {type(first).__name__}")
        self.run_id = first.run_id
        interval, idle = TimeoutsConfig().heartbeat_interval, TimeoutsConfig().heartbeat_timeout
        worker: SiteWorker | None = None
        spec: RunSpec | None = None
        try:
            spec = self.kept.policy.check_run(first.run_id, first.spec)
        except Refusal as exc:
            self.refusal = exc
        else:
            worker = self.kept.worker
            if worker is None or not worker.matches(first):
                try:
                    worker = self.kept.worker = await self._work(SiteWorker, self.cfg, first, spec)
                except RemoteProtocolError as exc:  # a spec that validates but cannot be set up here
                    worker = None
                    try:
                        self.kept.policy.refuse("spec", f"the run cannot be set up at this site: {exc}")
                    except Refusal as refusal:
                        self.refusal = refusal
        if worker is not None:
            self.conn.limit_payload(min(self.cfg.max_message_bytes, worker.shared_bytes + PAYLOAD_MARGIN))
            log.info("joined run %s as site index %d of %d", first.run_id, first.site_index, first.num_sites)
            assert spec is not None
            self._setup_secagg(first, spec)
            self.kept.witness.joined(first.run_id)
            self._stage_timeout = spec.secagg_stage_timeout
            interval, idle = spec.heartbeat_interval, spec.heartbeat_timeout
        if self.refusal is not None:
            log.error("this site will not take part in run %s: %s", first.run_id, self.refusal)
        send, recv = anyio.create_memory_object_stream[Message](16)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._reader, send, idle)
                tg.start_soon(self._heartbeat, interval)
                tg.start_soon(self._worker, recv, worker, tg.cancel_scope)
        except BaseExceptionGroup as group:
            ended, other = group.split(_SESSION_ENDS)
            if other is not None:
                raise
            # A final Shutdown is the answer, even when the coordinator's hang-up right after it
            # reached the reader first; otherwise the first way the session ended is what it reports.
            if not self.final:
                raise _first_leaf(ended) from None

    def _setup_secagg(self, welcome: Welcome, spec: RunSpec) -> None:
        """One secure-aggregation machine per run, kept across reconnects (it remembers past rounds)."""
        if not spec.secagg.enabled:
            self.kept.secagg = None
            return
        digest = spec_digest(welcome.spec)
        existing = self.kept.secagg
        if existing is not None and existing.run_id == welcome.run_id and existing.spec_digest == digest:
            return
        self.kept.secagg = ClientStateMachine(
            site_id=self.cfg.site_id, identity=self.identity, run_id=welcome.run_id, secagg=spec.secagg,
            spec_digest=digest, policy=self.kept.policy, replay=self.kept.replay,
        )

    async def _reader(self, send: MemoryObjectSendStream[Message], idle: float) -> None:
        async with send:
            while True:
                with anyio.fail_after(idle):
                    msg = await self.conn.receive()
                if not isinstance(msg, Heartbeat):
                    await send.send(msg)

    async def _heartbeat(self, interval: float) -> None:
        seq = 0
        while True:
            await anyio.sleep(interval)
            seq += 1
            await self.conn.send(Heartbeat(seq))

    async def _worker(self, recv: MemoryObjectReceiveStream[Message], worker: SiteWorker | None,
                      session: anyio.CancelScope) -> None:
        """Act on the coordinator's messages in order; a Shutdown ends the whole session. Trainings
        run as tasks of this worker's group, so whatever ends one ends the session too."""
        secure = self.kept.secagg
        async with anyio.create_task_group() as tg:
            async for msg in recv:
                if not isinstance(msg, RoundRecord):
                    self.kept.witness.settle(self.run_id)
                if worker is None:
                    await self._refuse(msg)
                else:
                    await self._handle(msg, worker, secure, tg)
                if self.final or self._ended:
                    session.cancel()
                    return

    async def _refuse(self, msg: Message) -> None:
        """The run breaks this site's policy: decline every round for good, and do nothing else."""
        assert self.refusal is not None
        if isinstance(msg, FitIns):
            self.conn.pool.release(msg.params.values())
            await self._send_decline(msg.round, msg.attempt, f"policy {self.refusal.rule}", permanent=True)
        elif isinstance(msg, Shutdown):
            self.final, self._ended = msg.final, True
        elif isinstance(msg, (*SECAGG_TO_SITE, RoundAborted, RoundRecord)):
            pass  # nothing to answer: this site is in no round
        else:
            raise RemoteProtocolError(f"{type(msg).__name__} for a site that refused the run ({self.refusal})")

    async def _handle(
        self, msg: Message, worker: SiteWorker, secure: ClientStateMachine | None, tg: anyio.abc.TaskGroup
    ) -> None:
        if isinstance(msg, FitIns):
            self.faults.reached("fit", msg.round)
            witness = self.kept.witness
            try:
                witness.before_fit(self.run_id, msg.round)
            except Refusal as exc:
                self.conn.pool.release(msg.params.values())
                await self._send_decline(msg.round, msg.attempt, f"policy {exc.rule}",
                                         permanent=witness.disputed(self.run_id))
                return
            witness.asked(self.run_id, msg.round, msg.attempt)
            if secure is not None:
                # Key set-up messages keep flowing while we train; the update is masked when ready.
                if await self._secure_step(secure, msg, lambda: secure.receive(msg)):
                    self.kept.latest_fit = (msg.round, msg.attempt)
                    assert secure.fit_binding is not None  # the FitIns just accepted
                    tg.start_soon(self._train_secure, msg, secure.fit_binding, worker, secure)
                else:
                    self.conn.pool.release(msg.params.values())
                return
            t0 = time.monotonic()
            try:
                async with self.kept.training:
                    try:
                        res = await self._work(worker.fit, msg, self.cfg.policy.equal_weight,
                                               self._progress(msg.round, worker))
                    finally:
                        self._progress_done()
            except BudgetExhausted as exc:
                self.conn.pool.release(msg.params.values())
                log.warning("%s", exc)
                await self._send_decline(msg.round, msg.attempt, BudgetExhausted.REASON, permanent=True)
                return
            self._trained(msg.round, worker, worker.last_steps, time.monotonic() - t0)
            self.conn.pool.release(msg.params.values())  # copied into the model; reuse for the next round
            await self.conn.send(res)
            witness.sent_update(self.run_id, msg.round, msg.attempt)
        elif isinstance(msg, SECAGG_TO_SITE):
            if secure is None:
                raise RemoteProtocolError("secure-aggregation message, but this run has it off")
            if self._declined(msg.round, msg.attempt):
                self._started_event(msg.round, msg.attempt).set()  # its training, if any, stops waiting
                return  # this site declined that round attempt: it says nothing more in it
            if isinstance(msg, ShareDelivery):
                self.faults.reached("share", msg.round)
            elif isinstance(msg, SecAggStart):
                self.faults.reached("keys", msg.round)
            elif isinstance(msg, UnmaskRequest):
                self.faults.reached("unmask", msg.round)
            await self._secure_step(secure, msg, lambda: secure.receive(msg))
            if isinstance(msg, SecAggStart):
                self._started_event(msg.round, msg.attempt).set()
        elif isinstance(msg, EvaluateIns):
            async with self.kept.training:  # evaluation loads the global model into the same module
                res_eval = await self._work(worker.evaluate, msg, self.cfg.policy.report_privacy)
            if msg.split == "val":  # the round's new global model: its record must name this digest
                self.kept.witness.evaluated(self.run_id, msg.round, params_digest(msg.params), res_eval.metrics)
            self.conn.pool.release(msg.params.values())
            await self.conn.send(res_eval)
        elif isinstance(msg, RoundRecord):
            try:
                self.kept.witness.record(self.run_id, msg)
            except Refusal:
                pass  # logged and kept as evidence; every later FitIns of this run is declined for good
        elif isinstance(msg, RoundAborted):
            log.warning("round %d attempt %d aborted: %s", msg.round, msg.attempt, msg.reason)
            self.kept.witness.aborted(self.run_id, msg.round, msg.attempt)
        elif isinstance(msg, Shutdown):
            log.info("coordinator says: %s", msg.reason)
            if msg.final and (missing := self.kept.witness.pending_round(self.run_id)) is not None:
                log.error("the federation ended without the coordinator's signed record of round %d, whose model "
                          "this site evaluated: this site holds no receipt of it", missing)
            self.final = msg.final
            self._ended = True
        else:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the coordinator")

    def _progress(self, rnd: int, worker: SiteWorker) -> OnStep | None:
        bar = self.kept.progress
        return bar.round(rnd, worker.expected_steps()) if bar is not None else None

    def _progress_done(self) -> None:
        if self.kept.progress is not None:
            self.kept.progress.finish()

    def _trained(self, rnd: int, worker: SiteWorker, steps: int, seconds: float) -> None:
        examples = len(worker.data.train) * worker.train_cfg.local_epochs
        log.info("round %d: trained on %d examples in %.1fs", rnd, examples, seconds)
        self.kept.metrics.trained(examples=examples, steps=steps, seconds=seconds,
                                  epsilon=worker.ledger.epsilon() if worker.ledger is not None else None)

    async def _send_decline(self, rnd: int, attempt: int, reason: str, *, permanent: bool) -> None:
        """One Decline per round attempt: the coordinator counts this site out and goes on.
        ``reason`` names a rule, never a detail; the detail is in this site's log."""
        if self._declined(rnd, attempt):
            return
        self.kept.declined.add((self.run_id, rnd, attempt))
        self.kept.witness.declined(self.run_id, rnd, attempt)
        self.kept.metrics.refusals.labels(reason[:64]).inc()
        log.warning("round %d.%d: declining (%s)", rnd, attempt, reason)
        await self.conn.send(Decline(rnd, attempt, reason[:4000], permanent))

    async def _work(self, fn: Any, *args: Any) -> Any:
        """Run the site's learning in the training thread.  What the coordinator sent can break it
        (a model with huge weights gives NaN outputs, a spec names data this site lacks): that
        ends this session, with the reason in the log, never the site process."""
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except (ValueError, ArithmeticError, RuntimeError, OSError) as exc:
            log.error("%s failed on what the coordinator sent: %s: %s", getattr(fn, "__name__", fn),
                      type(exc).__name__, exc)
            raise RemoteProtocolError(f"{type(exc).__name__}: {exc}") from None

    def _declined(self, rnd: int, attempt: int) -> bool:
        return (self.run_id, rnd, attempt) in self.kept.declined

    def _started_event(self, rnd: int, attempt: int) -> anyio.Event:
        return self._round_started.setdefault((rnd, attempt), anyio.Event())

    async def _secure_step(self, secure: ClientStateMachine, about: Message | FitIns, step: Any) -> bool:
        """Run one step of the machine and send its replies; a refusal becomes a Decline. True if it went on."""
        try:
            replies = step()
        except Refusal as exc:
            # The rule only: a detail (a count, a size) could tell the coordinator about the data.
            await self._send_decline(about.round, about.attempt, f"policy {exc.rule}", permanent=False)  # type: ignore[attr-defined]
            return False
        for reply in replies:
            await self.conn.send(reply)
            if isinstance(reply, MaskedInput):
                self.kept.witness.sent_update(self.run_id, reply.round, reply.attempt)
                self.faults.reached("masked", reply.round)
            elif isinstance(reply, ConsistencySig) and isinstance(about, ConsistencyCheck):
                self.kept.witness.signed_survivors(self.run_id, reply.round, reply.attempt, list(about.survivors))
        return True

    async def _train_secure(
        self, ins: FitIns, trained_on: tuple[bytes, dict], worker: SiteWorker, secure: ClientStateMachine
    ) -> None:
        """Train from ``ins``, whose digest the machine took when it accepted it (``trained_on``)."""
        async with self.kept.training:
            if self._declined(ins.round, ins.attempt) or (ins.round, ins.attempt) != self.kept.latest_fit:
                self.conn.pool.release(ins.params.values())
                return  # refused, or superseded, while the previous training ran
            t0 = time.monotonic()
            try:
                delta, result = await self._work(worker.train, ins, self._progress(ins.round, worker))
            except BudgetExhausted as exc:
                self.conn.pool.release(ins.params.values())
                log.warning("%s", exc)
                await self._send_decline(ins.round, ins.attempt, BudgetExhausted.REASON, permanent=True)
                return
            finally:
                self._progress_done()
        self.conn.pool.release(ins.params.values())
        self._trained(ins.round, worker, result.steps, time.monotonic() - t0)
        # The round's SecAggStart follows FitIns; wait for it rather than race it.
        with anyio.move_on_after(self._stage_timeout):
            await self._started_event(ins.round, ins.attempt).wait()
        if secure.round_key != (ins.round, ins.attempt) or self._declined(ins.round, ins.attempt):
            log.warning("round %d.%d moved on while training; update discarded", ins.round, ins.attempt)
            return
        # With equal_weight the site counts as one sample: its size never enters any sum.
        n = 1 if self.cfg.policy.equal_weight else result.num_samples
        await self._secure_step(secure, ins, lambda: secure.set_input(flatten(delta), n, trained_on=trained_on))
        if secure.clipped:
            log.info("secure aggregation: %d update values were clipped", secure.clipped)


# How a session ends when the coordinator or the channel breaks it (anything else is a bug).
_SESSION_ENDS = (ConnectionLost, RemoteProtocolError, TimeoutError)


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group
