"""The coordinator: an anyio server that authenticates sites and drives the round machine.

Resource handling: the listener, every site session and the federation driver are tasks of one
task group owned by :meth:`Coordinator.run`; each session owns its socket and a cancel scope the
driver can cancel to drop the site.  Sessions report to the driver through one bounded memory
stream of events, so the driver is the only task that touches round state.

Error handling: anything a site can cause (a malformed, unauthenticated, oversized or out-of-stage
message; silence past the heartbeat timeout; a reset) closes that site's channel, is logged, and
reaches the round as ``site_lost``.  The coordinator itself never stops for it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import anyio
import anyio.abc
import numpy as np
import torch
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client import CollectorRegistry

from ..config import FederationConfig, RunSpec
from ..data.loaders import dataset_info
from ..faults import NO_FAULTS, FaultPlan
from ..models import build, dp_norm, shared_keys
from ..observe.audit import AuditLog, params_digest
from ..observe.metrics import CoordinatorMetrics, serve_metrics
from ..observe.runlog import append_jsonl, trim_jsonl
from ..params import Params
from ..secagg import binding
from ..secagg.server import ServerStateMachine
from ..strategy.base import FitPlan, build_strategy
from ..strategy.selection import NotEnoughSites
from ..wire.channel import SiteRefused
from ..wire.connection import Connection, accept_handshake
from ..wire.crypto import Identity, PublicIdentity
from ..wire.errors import ConnectionLost, RemoteProtocolError
from ..wire.messages import (
    Decline,
    EvaluateRes,
    FitRes,
    Heartbeat,
    MaskedInput,
    Message,
    Shutdown,
    Welcome,
)
from ..wire.pool import ArrayPool
from .checkpoint import load_checkpoint, save_checkpoint
from .round import Outbound, ProtocolViolation, RoundMachine, RoundOutcome, SiteLost, TestEvaluation

__all__ = ["Coordinator", "FederationFailed", "ResumeError", "initial_params"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.npz"


class FederationFailed(Exception):
    """The federation could not finish (for example a round failed ``max_round_attempts`` times)."""


class ResumeError(Exception):
    pass


@dataclass
class _Session:
    site_id: int
    conn: Connection
    scope: anyio.CancelScope


@dataclass(frozen=True)
class _Joined:
    pass


def initial_params(cfg: FederationConfig) -> Params:
    """The round-0 global model: built from config with a fixed seed, shared tensors only."""
    channels, classes = dataset_info(cfg.data.dataset, cfg.data.path)
    torch.manual_seed(cfg.selection.seed)
    norm, groups = cfg.model.norm, cfg.model.groups
    if cfg.dp.enabled:  # the sites convert BatchNorm to GroupNorm for DP-SGD; so must the global model
        norm, groups = dp_norm(cfg.model.name, norm, groups)
    model = build(cfg.model.name, in_channels=channels, num_classes=classes, width=cfg.model.width, norm=norm,
                  groups=groups)
    state = model.state_dict()
    return {k: state[k].detach().cpu().numpy().astype(np.float32) for k in shared_keys(model, fedbn=cfg.strategy.fedbn)}


class Coordinator:
    def __init__(self, cfg: FederationConfig, *, resume: bool = False, faults: FaultPlan = NO_FAULTS) -> None:
        self.cfg = cfg
        self.identity = Identity.load(cfg.identity_key)
        self.roster = {s.id: PublicIdentity.from_hex(s.public_key) for s in cfg.sites}
        self.run_dir = cfg.run_dir
        self.checkpoint_path = self.run_dir / CHECKPOINT_NAME
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.audit = AuditLog(self.run_dir / "audit.jsonl")
        self.registry = CollectorRegistry()
        self.metrics = CoordinatorMetrics(self.registry)
        self.faults = faults
        self._sessions: dict[int, _Session] = {}
        self._exhausted: set[int] = set()  # sites that declined for good
        self._withdrawn: dict[int, str] = {}  # ... and why
        self._changed = anyio.Event()
        send, recv = anyio.create_memory_object_stream[tuple[int, Message | SiteLost | _Joined]](
            max(64, 8 * len(self.roster))
        )
        self._events_in: MemoryObjectSendStream[tuple[int, Message | SiteLost | _Joined]] = send
        self._events: MemoryObjectReceiveStream[tuple[int, Message | SiteLost | _Joined]] = recv
        # Every site gets the same spec; its digest is bound into each secure-aggregation round.
        self.spec = RunSpec.of(cfg).wire()
        self.spec_digest = binding.spec_digest(self.spec)
        self.history: list[dict[str, Any]] = []
        self._test: dict[str, Any] = {}  # the final score on the official test split
        self.start_round = 1
        params = initial_params(cfg)
        self.strategy = build_strategy(cfg, params)
        # One receive pool for every session: a few model-sized buffers, however many sites.
        model_bytes = sum(v.nbytes for v in params.values()) + 8
        self._pool = ArrayPool(max_bytes=4 * model_bytes)
        self._load_or_refuse(resume, params)
        self.port: int | None = None

    # -- resume ----------------------------------------------------------------------------------

    def _load_or_refuse(self, resume: bool, fresh: Params) -> None:
        if not resume:
            if self.checkpoint_path.exists():
                raise ResumeError(
                    f"{self.checkpoint_path} exists: continue it with --resume, or choose a new run_dir"
                )
            return
        if not self.checkpoint_path.exists():
            raise ResumeError(f"--resume: no checkpoint at {self.checkpoint_path}")
        params, velocity, state = load_checkpoint(self.checkpoint_path)
        if {k: v.shape for k, v in params.items()} != {k: v.shape for k, v in fresh.items()}:
            raise ResumeError(f"{self.checkpoint_path}: its model does not match the configured model")
        if state.get("run_id") != self.cfg.run_id:
            raise ResumeError(f"{self.checkpoint_path}: belongs to run {state.get('run_id')!r}, not {self.cfg.run_id!r}")
        self.strategy.params = params
        self.strategy.velocity = velocity
        self.history = state["history"]
        self._exhausted = set(state.get("exhausted", []))
        self.start_round = int(state["round"]) + 1
        for path in (self.metrics_path, self.audit.path):
            trim_jsonl(path, max_round=int(state["round"]))
        self.audit = AuditLog(self.audit.path)
        log.info("resuming after round %d from %s", state["round"], self.checkpoint_path)

    # -- running ---------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> dict[str, Any]:
        """Serve until the federation ends; returns the summary. The bound port goes to ``task_status``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        listener = await anyio.create_tcp_listener(local_host=self.cfg.listen.host, local_port=self.cfg.listen.port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        summary: dict[str, Any] = {}
        async with anyio.create_task_group() as tg:
            if self.cfg.metrics_port is not None:
                metrics_port = await tg.start(serve_metrics, self.registry, self.cfg.listen.host, self.cfg.metrics_port)
                log.info("Prometheus metrics on http://%s:%d/metrics", self.cfg.listen.host, metrics_port)
            tg.start_soon(listener.serve, self._handle_connection, tg)
            task_status.started(self.port)
            try:
                summary = await self._federate()
            finally:
                await self._shutdown_sites(summary.get("status", "stopped"))
                tg.cancel_scope.cancel()
        return summary

    async def _shutdown_sites(self, reason: str) -> None:
        with anyio.move_on_after(self.cfg.timeouts.shutdown, shield=True):
            async with anyio.create_task_group() as tg:
                for session in list(self._sessions.values()):
                    # "stopped" (a signal) is not final: sites keep reconnecting for a --resume.
                    msg = Shutdown(f"federation {reason}", reason != "stopped")
                    tg.start_soon(self._send_quietly, session, msg)

    async def _send_quietly(self, session: _Session, msg: Message) -> None:
        try:
            await session.conn.send(msg)
        except ConnectionLost:
            pass

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        self.metrics.connected_sites.set(len(self._sessions))

    async def _handle_connection(self, stream: anyio.abc.SocketStream) -> None:
        cfg = self.cfg
        async with stream:
            try:
                with anyio.fail_after(cfg.timeouts.handshake):
                    site_id, conn = await accept_handshake(
                        stream, self.identity, self.roster, max_frame_size=cfg.max_frame_bytes,
                        max_payload_bytes=cfg.max_message_bytes, chunk_bytes=cfg.chunk_bytes, pool=self._pool,
                    )
                    await conn.send(self._welcome(site_id))
            except SiteRefused as exc:
                self.metrics.refused.inc()
                log.warning("refused a connection: %s", exc)
                return
            except (RemoteProtocolError, ConnectionLost, TimeoutError) as exc:
                self.metrics.refused.inc()
                log.warning("handshake failed: %s", exc or type(exc).__name__)
                return
            old = self._sessions.get(site_id)
            if old is not None:
                log.info("site %d reconnected; closing its previous session", site_id)
                old.scope.cancel()
            with anyio.CancelScope() as scope:
                session = _Session(site_id, conn, scope)
                self._sessions[site_id] = session
                self._notify()
                log.info("site %d joined", site_id)
                await self._events_in.send((site_id, _Joined()))
                reason = "closed"
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._heartbeat, conn)
                        reason = await self._read_loop(site_id, conn)
                        tg.cancel_scope.cancel()
                finally:
                    if self._sessions.get(site_id) is session:
                        del self._sessions[site_id]
                        self._notify()
                        self.metrics.bytes_received.inc(conn.bytes_received)
                        self.metrics.bytes_sent.inc(conn.bytes_sent)
                        with anyio.CancelScope(shield=True):
                            await self._events_in.send((site_id, SiteLost(reason)))
            if scope.cancelled_caught:
                log.info("site %d session closed by the coordinator", site_id)

    async def _heartbeat(self, conn: Connection) -> None:
        seq = 0
        while True:
            await anyio.sleep(self.cfg.timeouts.heartbeat_interval)
            seq += 1
            try:
                await conn.send(Heartbeat(seq))
            except ConnectionLost:
                return

    async def _read_loop(self, site_id: int, conn: Connection) -> str:
        while True:
            try:
                with anyio.fail_after(self.cfg.timeouts.heartbeat_timeout):
                    msg = await conn.receive()
            except TimeoutError:
                log.warning("site %d: silent for %.0fs, dropping it", site_id, self.cfg.timeouts.heartbeat_timeout)
                return "heartbeat timeout"
            except RemoteProtocolError as exc:
                self.metrics.protocol_violations.inc()
                log.warning("site %d: protocol violation, closing its channel: %s", site_id, exc)
                return f"protocol violation: {exc}"
            except ConnectionLost:
                log.info("site %d disconnected", site_id)
                return "disconnected"
            if isinstance(msg, Heartbeat):
                continue
            await self._events_in.send((site_id, msg))

    def _welcome(self, site_id: int) -> Welcome:
        return Welcome(self.cfg.run_id, self.cfg.site_index(site_id), len(self.cfg.sites), self.spec)

    # -- the federation driver ---------------------------------------------------------------------

    def _eligible(self) -> list[int]:
        return sorted(s for s in self._sessions if s not in self._exhausted)

    async def _wait_for_sites(self, needed: int, timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            while len(self._eligible()) < needed:
                await self._changed.wait()
            return True
        return len(self._eligible()) >= needed

    async def _dispatch(self, outbound: list[Outbound]) -> None:
        """Send to every site at once, and to each site in order (its FitIns before its SecAggStart)."""
        if not outbound:
            return
        per_site: dict[int, list[Message]] = {}
        for out in outbound:
            per_site.setdefault(out.site, []).append(out.msg)
        async with anyio.create_task_group() as tg:
            for site, msgs in per_site.items():
                session = self._sessions.get(site)
                if session is not None:
                    tg.start_soon(self._send_or_drop, session, msgs)

    async def _send_or_drop(self, session: _Session, msgs: list[Message]) -> None:
        with anyio.move_on_after(self.cfg.timeouts.fit) as scope:
            try:
                for msg in msgs:
                    await session.conn.send(msg)
                return
            except ConnectionLost:
                pass
        if scope.cancelled_caught:
            log.warning("site %d: send timed out, dropping it", session.site_id)
        session.scope.cancel()

    def _recycle(self, site_id: int, event: Message) -> None:
        """The machine copied the update into its running sum: its buffers can take the next one."""
        session = self._sessions.get(site_id)
        if session is not None and isinstance(event, FitRes):
            session.conn.pool.release(event.update.values())
        elif session is not None and isinstance(event, MaskedInput):
            session.conn.pool.release(event.vector.values())

    def _drop(self, site_id: int) -> None:
        session = self._sessions.get(site_id)
        if session is not None:
            session.scope.cancel()

    def _handle_idle(self, site_id: int, event: Message | SiteLost | _Joined) -> None:
        """Between rounds only late answers are acceptable; anything else is a violation."""
        if isinstance(event, SiteLost | _Joined | FitRes | EvaluateRes | Decline):
            return
        self.metrics.protocol_violations.inc()
        log.warning("site %d: %s outside a round, closing its channel", site_id, type(event).__name__)
        self._drop(site_id)

    def _drain_idle_events(self) -> None:
        while True:
            try:
                site_id, event = self._events.receive_nowait()
            except anyio.WouldBlock:
                return
            self._handle_idle(site_id, event)

    async def _run_round(self, rnd: int, attempt: int) -> RoundOutcome:
        plan = self.strategy.configure_fit(rnd, attempt, self._eligible())
        evaluators = self.strategy.configure_evaluate(rnd, self._eligible())
        machine = RoundMachine(
            rnd=rnd, attempt=attempt, selected=plan.sites, evaluators=evaluators,
            min_clients=self.cfg.min_clients, global_params=self.strategy.params,
            fit_config=plan.config, strategy=self.strategy, secagg=self._secagg_machine(rnd, attempt, plan),
        )
        log.info("round %d (attempt %d): selected %s", rnd, attempt, plan.sites)
        await self._dispatch(machine.start())
        t = self.cfg.timeouts
        timeouts = {"fit": t.fit, "secagg": t.secagg_stage, "evaluate": t.evaluate}
        while not machine.finished:
            stage = machine.stage_key
            with anyio.move_on_after(timeouts[machine.deadline_kind]) as scope:
                while machine.stage_key == stage and not machine.finished:
                    site_id, event = await self._events.receive()
                    if isinstance(event, _Joined):
                        continue
                    if isinstance(event, SiteLost):
                        out = machine.site_lost(site_id)
                    else:
                        try:
                            out = machine.receive(site_id, event)
                        except ProtocolViolation as exc:
                            self.metrics.protocol_violations.inc()
                            log.warning("%s; closing its channel", exc)
                            self._drop(site_id)
                            out = machine.site_lost(site_id)
                        self._recycle(site_id, event)
                    await self._dispatch(out)
            if scope.cancelled_caught and machine.stage_key == stage:
                log.warning("round %d: stage %s timed out", rnd, "/".join(x for x in stage if x))
                await self._dispatch(machine.timed_out())
        return machine.outcome

    def _secagg_machine(self, rnd: int, attempt: int, plan: FitPlan) -> ServerStateMachine | None:
        sa = self.cfg.secagg
        if not sa.enabled:
            return None
        params = binding.RoundParams.derive(
            run_id=self.cfg.run_id, round=rnd, attempt=attempt, participants=plan.sites, secagg=sa,
            params_digest=binding.params_digest(self.strategy.params), fit_config=plan.config,
            vector_len=sum(v.size for v in self.strategy.params.values()) + 1, spec_digest=self.spec_digest,
        )
        return ServerStateMachine(params=params, min_clients=self.cfg.min_clients, identities=self.roster)

    async def _federate(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.monotonic()
        if self.start_round > cfg.rounds:
            return self._write_summary("completed", time.monotonic() - t_start)
        # At start-up give every enrolled site a chance to join; later rounds go with whoever is there.
        await self._wait_for_sites(len(self.roster), cfg.timeouts.wait_for_sites)
        rnd = self.start_round
        while rnd <= cfg.rounds:
            for attempt in range(1, cfg.max_round_attempts + 1):
                if len(set(self.roster) - self._exhausted) < cfg.min_clients:
                    # Sites leave for good when their privacy budget is spent, or when the run breaks
                    # their policy (a Decline whose reason starts with "policy ", protocol/SPEC.md §7).
                    refused = {s: r for s, r in self._withdrawn.items() if r.startswith("policy ")}
                    log.warning("only %d sites can still train, min_clients=%d; ending (policy refusals: %s)",
                                len(set(self.roster) - self._exhausted), cfg.min_clients, refused or "none")
                    why = "refused the run by their policy or spent their privacy budget" if refused else \
                        "spent their privacy budget"
                    print(f"federation ends before round {rnd}: sites {sorted(self._exhausted)} {why}; fewer than "
                          f"min_clients={cfg.min_clients} can train", flush=True)
                    status = "refused_by_sites" if refused else "budget_exhausted"
                    return self._write_summary(status, time.monotonic() - t_start)
                if not await self._wait_for_sites(cfg.min_clients, cfg.timeouts.wait_for_sites):
                    self._finish_failed(
                        rnd, f"only {len(self._eligible())} eligible sites connected, min_clients={cfg.min_clients}",
                        t_start,
                    )
                self._drain_idle_events()
                t0 = time.monotonic()
                try:
                    outcome = await self._run_round(rnd, attempt)
                except NotEnoughSites as exc:
                    self._finish_failed(rnd, str(exc), t_start)
                self._exhausted.update(outcome.exhausted)
                self._withdrawn.update({s: outcome.declined.get(s, "") for s in outcome.exhausted})
                duration = time.monotonic() - t0
                if outcome.abort_reason is None:
                    self._complete_round(outcome, duration)
                    break
                self.metrics.rounds_aborted.inc()
                log.warning("round %d attempt %d aborted: %s", rnd, attempt, outcome.abort_reason)
                print(f"round {rnd} attempt {attempt} aborted: {outcome.abort_reason}", flush=True)
                self.audit.append({
                    "round": rnd, "attempt": attempt, "status": "aborted", "selected": outcome.selected,
                    "participants": outcome.participants, "dropped": outcome.dropped,
                    "reason": outcome.abort_reason, "time": time.time(),
                })
            else:
                self._finish_failed(rnd, f"aborted {cfg.max_round_attempts} times", t_start)
            self.faults.reached("round_done", rnd)
            rnd += 1
        self._test = await self._final_test(cfg.rounds)
        return self._write_summary("completed", time.monotonic() - t_start)

    async def _final_test(self, rnd: int) -> dict[str, Any]:
        """Score the final model on the official test split, predictions pooled over the sites."""
        sites = self._eligible()
        if not sites:
            return {}
        machine = TestEvaluation(rnd=rnd, sites=sites, params=self.strategy.params)
        self._drain_idle_events()
        await self._dispatch(machine.start())
        with anyio.move_on_after(self.cfg.timeouts.evaluate):
            while not machine.finished:
                site_id, event = await self._events.receive()
                if isinstance(event, SiteLost):
                    machine.site_lost(site_id)
                elif not isinstance(event, _Joined):
                    try:
                        machine.receive(site_id, event)
                    except ProtocolViolation as exc:
                        log.warning("%s; closing its channel", exc)
                        self._drop(site_id)
                        machine.site_lost(site_id)
        machine.timed_out()
        pooled = machine.pooled()
        if "test_auc" in pooled:
            print(f"test  auc={pooled['test_auc']:.4f}  acc={pooled['test_accuracy']:.4f}  "
                  f"on {pooled['test_examples']} images from sites {pooled['test_sites']}", flush=True)
        return pooled

    def _complete_round(self, outcome: RoundOutcome, duration: float) -> None:
        assert outcome.params is not None
        ev = outcome.evaluation
        record: dict[str, Any] = {
            "round": outcome.round,
            "attempt": outcome.attempt,
            "selected": outcome.selected,
            "participants": outcome.participants,
            "dropped": outcome.dropped,
            "declined": {str(k): v for k, v in outcome.declined.items()},
            "duration_s": round(duration, 3),
        }
        for key in ("auc", "accuracy", "loss"):
            if key in ev:
                record[key] = ev[key]
                record[f"site_{key}"] = ev[f"site_{key}"]
        record["secure_aggregation"] = outcome.secagg_stages is not None
        if outcome.secagg_stages is not None:
            record["secagg_stages"] = outcome.secagg_stages
        for key in ("epsilon", "noise_multiplier"):
            values = {str(s): m[key] for s, m in sorted(outcome.site_eval.items()) if key in m}
            if values:
                record[key] = values
        if outcome.exhausted:
            record["exhausted"] = sorted(outcome.exhausted)
        train_loss = {str(s): m["train_loss"] for s, m in outcome.site_metrics.items() if "train_loss" in m}
        if train_loss:
            record["site_train_loss"] = train_loss
        digest = params_digest(outcome.params)
        append_jsonl(self.metrics_path, record)
        self.audit.append({
            "round": outcome.round, "attempt": outcome.attempt, "status": "completed",
            "participants": outcome.participants, "dropped": outcome.dropped,
            "model_sha256": digest, "metrics": {k: record[k] for k in ("auc", "accuracy") if k in record},
            "epsilon": record.get("epsilon", {}), "declined": record["declined"],
            "time": time.time(),
        })
        self.history.append(record)
        save_checkpoint(
            self.checkpoint_path, params=outcome.params, velocity=self.strategy.velocity,
            state={"run_id": self.cfg.run_id, "round": outcome.round, "history": self.history,
                   "exhausted": sorted(self._exhausted), "model_sha256": digest},
        )
        self.metrics.rounds_completed.inc()
        self.metrics.round_seconds.observe(duration)
        self.metrics.participants.set(len(outcome.participants))
        self.metrics.dropped.inc(len(outcome.dropped))
        for key in ("auc", "accuracy"):
            if key in record:
                self.metrics.metric.labels(key).set(record[key])
        auc = record.get("auc")
        print(
            f"round {outcome.round}/{self.cfg.rounds}  participants={outcome.participants}  dropped={outcome.dropped}  "
            f"auc={'n/a' if auc is None else f'{auc:.4f}'}  acc={record.get('accuracy', math.nan):.4f}  "
            f"{duration:.1f}s",
            flush=True,
        )

    def _finish_failed(self, rnd: int, reason: str, t_start: float) -> NoReturn:
        print(f"federation failed at round {rnd}: {reason}", flush=True)
        log.error("federation stopped at round %d: %s", rnd, reason)
        self._write_summary("failed", time.monotonic() - t_start, reason=reason)
        raise FederationFailed(reason)

    def _latest(self, key: str) -> dict[str, float]:
        """Each site's most recent value of a per-site metric (a site may miss later rounds)."""
        out: dict[str, float] = {}
        for record in self.history:
            out.update(record.get(key, {}))
        return dict(sorted(out.items()))

    def _write_summary(self, status: str, wall: float, *, reason: str | None = None) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        summary: dict[str, Any] = {
            "run_id": self.cfg.run_id,
            "status": status,
            "rounds_planned": self.cfg.rounds,
            "rounds_completed": len(self.history),
            "final": {k: last[k] for k in ("auc", "accuracy", "loss", "site_auc", "site_accuracy") if k in last},
            "epsilon": self._latest("epsilon"),
            "noise_multiplier": self._latest("noise_multiplier"),
            "exhausted": sorted(self._exhausted),
            "wall_s": round(wall, 3),
            "mean_round_s": round(sum(h["duration_s"] for h in self.history) / len(self.history), 3)
            if self.history else None,
            "model_sha256": params_digest(self.strategy.params),
            **self._test,
        }
        if reason:
            summary["reason"] = reason
        from ..fsutil import atomic_write_bytes

        atomic_write_bytes(Path(self.run_dir) / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary
