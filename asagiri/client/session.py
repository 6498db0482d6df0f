"""One session of a site with the coordinator: a thin pump between the channel, the site's round
machine (``machine.py``) and the training thread.

The session answers heartbeats from its first moment to its last.  One task group holds three
tasks: ``_reader`` owns the channel's receive side (heartbeats and the idle timeout),
``_heartbeat`` tells the coordinator the site is alive, and ``_worker`` feeds each message to
the :class:`~asagiri.client.machine.SiteMachine` and carries out what it returns.  Work (setting
up the site's data and model, training, evaluating) runs in ``anyio.to_thread.run_sync``, the only
thread, so however long it takes the site keeps answering: only a round's deadline decides that
it is too slow, and only silence that it is gone.

What the site keeps across reconnects (its worker, its machine, its policy and records) lives in
:class:`Kept`.  A refusal leaves as a ``Decline`` naming its rule; a message that breaks the
protocol, or that the site's learning cannot use, ends the session (the site reconnects).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..config import SiteConfig, TimeoutsConfig
from ..faults import FaultPlan
from ..params import Params, flatten
from ..policy import SitePolicy
from ..secagg.binding import params_digest
from ..secagg.kernels import warm as warm_kernels
from ..site.control import OwnControl
from ..site.metrics import SiteMetrics
from ..site.receipts import RoundWitness
from ..site.worker import BudgetExhausted, SiteWorker
from ..train.loop import OnStep
from ..wire.connection import Connection
from ..wire.errors import ConnectionLost, RemoteProtocolError
from ..wire.messages import (
    Decline,
    EvaluateIns,
    FitIns,
    Heartbeat,
    MaskedInput,
    Message,
    SecAggStart,
    ShareDelivery,
    SumAnnounce,
    UnmaskRequest,
    Welcome,
)
from .machine import Action, End, Evaluate, Send, SetUp, SiteMachine, Train, Unreleased
from .progress import TrainingProgress

__all__ = ["Kept", "Session"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Where a site's fault plan (tests, soak runs) may stop it, by the message that arrived.
_FAULT_POINTS: dict[type, str] = {FitIns: "fit", SecAggStart: "keys", ShareDelivery: "share",
                                  UnmaskRequest: "unmask", SumAnnounce: "vouch"}


@dataclass
class Kept:
    """What a site keeps across reconnects: its round machine, and its worker (data, model, local
    layers, ledger)."""

    policy: SitePolicy
    machine: SiteMachine
    witness: RoundWitness
    metrics: SiteMetrics
    progress: TrainingProgress | None = None  # a bar of local training, on a terminal only
    worker: SiteWorker | None = None
    # One training at a time on the one model: a round refused or aborted early must not start
    # the next attempt's training while its own thread still runs.
    training: anyio.Lock = field(default_factory=anyio.Lock)


# Headroom over the model's own size for a message's header and bookkeeping.
PAYLOAD_MARGIN = 1 << 20


class Session:
    def __init__(self, cfg: SiteConfig, conn: Connection, kept: Kept, faults: FaultPlan) -> None:
        self.cfg = cfg
        self.conn = conn
        self.kept = kept
        self.machine = kept.machine
        self.faults = faults
        self.final = False
        self._ended = False
        self._set_up = anyio.Event()  # the worker for this session's run is built (or failed)
        # FitIns whose training task waits (for set-up, or for the training before it), by id; the
        # one who takes an entry out gives its tensors back to the pool
        self._waiting: dict[int, FitIns] = {}

    async def run(self) -> None:
        first = await self.conn.receive()
        if not isinstance(first, Welcome):
            raise RemoteProtocolError(f"expected Welcome, got {type(first).__name__}")
        actions = self.machine.welcome(first)
        spec = self.machine.spec
        known = self.kept.worker
        if spec is not None and known is not None and known.matches(first):
            # the model is known already: cap what the coordinator may send before reading more
            # (a new run's cap comes when its set-up is done; until then the configured one holds)
            self._cap_payload(known)
        # Until the run is accepted (and for a run this site refuses): the config's defaults.
        timeouts = TimeoutsConfig()
        interval, idle = (timeouts.heartbeat_interval, timeouts.heartbeat_timeout) if spec is None else \
            (spec.heartbeat_interval, spec.heartbeat_timeout)
        send, recv = anyio.create_memory_object_stream[Message](16)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._reader, send, idle)
                tg.start_soon(self._heartbeat, interval)
                tg.start_soon(self._worker, actions, recv, tg.cancel_scope)
        except BaseExceptionGroup as group:
            ended, other = group.split(_SESSION_ENDS)
            if other is not None:
                raise
            # A final Shutdown is the answer, even when the coordinator's hang-up right after it
            # reached the reader first; otherwise the first way the session ended is what it reports.
            if not self.final:
                raise _first_leaf(ended) from None

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

    async def _worker(self, first: list[Action], recv: MemoryObjectReceiveStream[Message],
                      session: anyio.CancelScope) -> None:
        """Set up for the run, then act on the coordinator's messages in order.  Trainings run as
        tasks of this worker's group, so whatever ends one ends the session too."""
        async with anyio.create_task_group() as tg:
            await self._act(first, tg)
            async for msg in recv:
                if (point := _FAULT_POINTS.get(type(msg))) is not None:
                    self.faults.reached(point, msg.round)  # type: ignore[attr-defined]
                actions = self.machine.receive(msg)
                if isinstance(msg, FitIns | EvaluateIns) and not any(
                        isinstance(a, Train | Evaluate) and a.ins is msg for a in actions):
                    self.conn.pool.release(msg.params.values())  # nothing will read it
                await self._act(actions, tg)
                if self.final or self._ended:
                    session.cancel()
                    return

    async def _act(self, actions: list[Action], tg: anyio.abc.TaskGroup | None = None) -> None:
        """Carry out the machine's actions in order (``tg``: where a training starts)."""
        for action in actions:
            if isinstance(action, Send):
                await self._send(action.msg)
            elif isinstance(action, SetUp):
                assert tg is not None, "only a Welcome sets up"
                tg.start_soon(self._build, action)
            elif isinstance(action, Train):
                assert tg is not None, "only a message starts a training"
                self._drop_superseded()
                self._waiting[id(action.ins)] = action.ins
                tg.start_soon(self._train, action)
            elif isinstance(action, Evaluate):
                await self._evaluate(action.ins)
            elif isinstance(action, Unreleased):
                self._refund(action.round)
            elif isinstance(action, End):
                self.final, self._ended = action.final, True

    async def _send(self, msg: Message) -> None:
        await self.conn.send(msg)
        if isinstance(msg, Decline):
            self.kept.metrics.refusals.labels(msg.rule).inc()
        elif isinstance(msg, MaskedInput):
            self.faults.reached("masked", msg.round)

    def _refund(self, rnd: int) -> None:
        """A trained update that never left: its DP-SGD charge is given back (DP sites only)."""
        worker = self.kept.worker
        if worker is None or worker.ledger is None:
            return
        if worker.ledger.refund(rnd):
            log.info("round %d: the update never left this site; its privacy charge is given back (epsilon spent "
                     "now %.3f)", rnd, worker.ledger.epsilon())

    def _cap_payload(self, worker: SiteWorker) -> None:
        """Nothing the coordinator sends may be larger than the model's shared parameters (or, with
        secure aggregation, the announced sum: one ring word per value and the count) and a margin."""
        largest = worker.shared_bytes
        spec = self.machine.spec
        if spec is not None and spec.secagg.enabled:
            largest = max(largest, (worker.summed_values + 1) * (spec.secagg.bits // 8))
        self.conn.limit_payload(min(self.cfg.max_message_bytes, largest + PAYLOAD_MARGIN))

    async def _build(self, action: SetUp) -> None:
        """Build the site's worker in the training thread while the session goes on: heartbeats and
        the protocol's own steps (key set-up, records) need no data; a training waits for this."""
        problem = None
        try:
            worker = self.kept.worker
            if worker is None or not worker.matches(action.welcome):  # a new run: its data and model
                self.kept.worker = None
                try:
                    worker = self.kept.worker = await self._work(SiteWorker, self.cfg, action.welcome, action.spec)
                except RemoteProtocolError as exc:  # a spec that validates but cannot be set up here
                    problem = str(exc)
                except Exception as exc:  # noqa: BLE001 - whatever a spec breaks in set-up, the site declines
                    log.exception("set-up failed on the run's spec")
                    problem = f"{type(exc).__name__}: {exc}"
            if worker is not None and problem is None:
                self._cap_payload(worker)
                if action.spec.secagg.enabled:
                    await anyio.to_thread.run_sync(warm_kernels, action.spec.secagg.bits)
            worker = self.kept.worker
            examples, initial = (0, None) if worker is None else (len(worker.data.train), worker.initial)
            # the machine learns the outcome before a waiting training wakes (no await between)
            actions = self.machine.set_up(action.welcome, problem, examples=examples, initial=initial)
        finally:
            self._set_up.set()
        await self._act(actions)

    def _drop_superseded(self) -> None:
        """A waiting FitIns that a newer one superseded gives its tensors back now, not when its
        task wakes: a coordinator that sends FitIns after FitIns while this site sets up (or
        trains) cannot pile models up in its memory.  One waits at a time."""
        for key, ins in list(self._waiting.items()):
            if not self.machine.wants(ins):
                del self._waiting[key]
                self.conn.pool.release(ins.params.values())
                ins.params.clear()  # its waiting task holds the message, not the tensors

    async def _train(self, action: Train) -> None:
        ins, owned = action.ins, False
        try:
            await self._set_up.wait()
            worker = self.kept.worker
            if worker is None:
                return  # it could not be set up: the machine declines the round
            async with self.kept.training:
                owned = self._waiting.pop(id(ins), None) is not None
                if not owned or not self.machine.wants(ins):
                    return  # refused, or superseded, while it waited
                t0 = time.monotonic()
                try:
                    on_step = self._progress(ins.round, worker)
                    if action.secure:
                        delta, result = await self._work(worker.train, ins, on_step, self._scaffold(ins))
                        steps, outcome = result.steps, (flatten(delta), result.num_samples)
                    else:
                        res = await self._work(worker.fit, ins, self.kept.policy, on_step)
                        steps, outcome = worker.last_steps, res
                except BudgetExhausted as exc:
                    log.warning("%s", exc)
                    await self._act(self.machine.budget_spent(ins))
                    return
                finally:
                    self._progress_done()
        finally:
            if owned or self._waiting.pop(id(ins), None) is not None:
                self.conn.pool.release(ins.params.values())  # copied into the model; reuse for the next round
        self._trained(ins.round, worker, steps, time.monotonic() - t0)
        await self._act(self.machine.trained(ins, outcome))

    async def _evaluate(self, ins: EvaluateIns) -> None:
        try:
            await self._set_up.wait()
            worker = self.kept.worker
            if worker is None:
                raise RemoteProtocolError("EvaluateIns for a run this site could not set up")
            async with self.kept.training:  # evaluation loads the global model into the same module
                res = await self._work(worker.evaluate, ins, self.kept.policy)
        finally:
            self.conn.pool.release(ins.params.values())
        await self._act(self.machine.evaluated(ins, res))

    def _scaffold(self, ins: FitIns) -> tuple[Params | None, OwnControl] | None:
        """SCAFFOLD's inputs to training on ``ins``: ``c`` from the model this site derived (the
        one ``ins`` names, which it checked on accepting it) and the site's own ``c_i``."""
        models = self.machine.models
        if models.control is None:
            return None
        return models.server_control(params_digest(ins.params)), models.control

    def _progress(self, rnd: int, worker: SiteWorker) -> OnStep | None:
        bar = self.kept.progress
        return bar.round(rnd, worker.expected_steps()) if bar is not None else None

    def _progress_done(self) -> None:
        if self.kept.progress is not None:
            self.kept.progress.finish()

    def _trained(self, rnd: int, worker: SiteWorker, steps: int, seconds: float) -> None:
        examples = steps * min(worker.train_cfg.batch_size, len(worker.data.train))  # DP-SGD's: expected
        epsilon = worker.ledger.epsilon() if worker.ledger is not None else None
        # the privacy spent, on the site's own console after every round it trains (it stays here
        # unless policy.report_privacy sends it)
        spent = "" if epsilon is None else f"; privacy spent: epsilon={epsilon:.3f} of {worker.dp.target_epsilon:g}"
        log.info("round %d: trained on about %d examples (%d steps) in %.1fs%s", rnd, examples, steps, seconds, spent)
        self.kept.metrics.trained(examples=examples, steps=steps, seconds=seconds, epsilon=epsilon)

    async def _work(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the site's learning in the training thread.  What the coordinator sent can break it
        (a model with huge weights gives NaN outputs, a spec names data this site lacks): that
        ends this session, with the reason in the log, never the site process."""
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except (ValueError, ArithmeticError, RuntimeError, OSError) as exc:
            log.error("%s failed on what the coordinator sent: %s: %s", getattr(fn, "__name__", fn),
                      type(exc).__name__, exc)
            raise RemoteProtocolError(f"{type(exc).__name__}: {exc}") from None


# How a session ends when the coordinator or the channel breaks it (anything else is a bug).
_SESSION_ENDS = (ConnectionLost, RemoteProtocolError, TimeoutError)


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group
