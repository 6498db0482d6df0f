"""A site: connect (with backoff), authenticate, then train and evaluate on request.

One task group per session: ``_reader`` owns the connection's receive side (heartbeats and the
idle timeout), ``_heartbeat`` keeps the coordinator informed while we train, and ``_worker``
handles requests one at a time.  Training and evaluation leave the event loop through
``anyio.to_thread.run_sync``, the only thread.  The model, the site's data and its local
(FedBN) layers live in :class:`SiteWorker`, which survives reconnects.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import numpy as np
import torch
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..config import DataConfig, DPConfig, ModelConfig, SiteConfig, StrategyConfig, TrainConfig
from ..data.loaders import SiteData, load_site_data
from ..models import build, prepare_data, shared_keys
from ..privacy.engine import dp_compatible, noise_for_target, steps_per_round, train_dp
from ..privacy.ledger import PrivacyLedger
from ..secagg.client import ClientStateMachine, SecAggRefused
from ..strategy.aggregate import flatten
from ..train import TrainResult, evaluate, train_local
from ..wire.channel import SiteRefused
from ..wire.connection import Connection, connect_handshake
from ..wire.crypto import AuthenticationFailed, Identity, PublicIdentity
from ..wire.errors import ConnectionLost, RemoteProtocolError
from ..wire.messages import (
    ConsistencyCheck,
    Decline,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Heartbeat,
    KeyRoster,
    Message,
    RoundAborted,
    SecAggStart,
    ShareDelivery,
    Shutdown,
    UnmaskRequest,
    Welcome,
)

SECAGG_TO_SITE = (SecAggStart, KeyRoster, ShareDelivery, ConsistencyCheck, UnmaskRequest)

__all__ = ["FaultPlan", "SiteWorker", "run_client"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaultPlan:
    """Test-only fault injection: SIGKILL this process on receiving FitIns for round ``kill_at_fit``,
    or, under secure aggregation, once it has shared its keys in round ``kill_after_share``."""

    kill_at_fit: int | None = None
    kill_after_share: int | None = None


class BudgetExhausted(Exception):
    """One more round would spend more privacy than the site's target: it declines, permanently."""

    def __init__(self, spent: float, target: float) -> None:
        super().__init__(f"privacy budget: epsilon {spent:.3f} of {target:g} spent; one more round would exceed it")


class SiteWorker:
    """Everything a site keeps across rounds and reconnects: spec, data, model, local layers."""

    def __init__(self, cfg: SiteConfig, welcome: Welcome) -> None:
        spec = welcome.spec
        self.run_id = welcome.run_id
        self.model_cfg = ModelConfig.model_validate(spec["model"])
        self.train_cfg = TrainConfig.model_validate(spec["train"])
        self.strategy_cfg = StrategyConfig.model_validate(spec["strategy"])
        self.data_cfg = DataConfig.model_validate(spec["data"])
        self.spec = spec
        self.device = _pick_device(cfg.device)
        part = self.data_cfg.partition
        self.data: SiteData = load_site_data(
            dataset=self.data_cfg.dataset, path=cfg.data_path, site_index=welcome.site_index,
            num_sites=welcome.num_sites, scheme=part.scheme, alpha=part.alpha, seed=part.seed,
            synthetic_samples=self.data_cfg.synthetic_samples, image_size=self.data_cfg.image_size,
            cache_dir=cfg.state_dir / "cache", feature_key=part.feature_key,
            val_fraction=self.data_cfg.val_fraction,
        )
        self.data = prepare_data(self.model_cfg.name, self.data)  # fixed features, for models that take them
        torch.manual_seed(part.seed)
        self.model = build(
            self.model_cfg.name, in_channels=self.data.channels, num_classes=self.data.num_classes,
            width=self.model_cfg.width, norm=self.model_cfg.norm, groups=self.model_cfg.groups,
        ).to(self.device)
        self.dp = DPConfig.model_validate(spec.get("dp", {}))
        self.ledger: PrivacyLedger | None = None
        if self.dp.enabled:
            self._setup_dp(cfg, int(spec.get("rounds", 1)))
        self.shared = shared_keys(self.model, fedbn=self.strategy_cfg.fedbn)
        log.info(
            "site data: %d train / %d val / %s test images, device %s",
            len(self.data.train), len(self.data.val), len(self.data.test), self.device,
        )

    def _setup_dp(self, cfg: SiteConfig, rounds: int) -> None:
        self.model, changed = dp_compatible(self.model)
        self.model.to(self.device)
        if changed:
            log.info("DP-SGD: BatchNorm layers converted to GroupNorm (per-sample gradients need it)")
        log.warning("DP-SGD runs with Opacus secure_mode off: its noise comes from torch's generator, "
                    "not a cryptographic one")
        self.ledger = PrivacyLedger(cfg.state_dir / "privacy_ledger.json", delta=self.dp.target_delta)
        t = self.train_cfg
        self.sample_rate, self.steps = steps_per_round(len(self.data.train), t.batch_size, t.local_epochs)
        if self.dp.noise_multiplier == "auto":
            self.sigma = noise_for_target(target_epsilon=self.dp.target_epsilon, delta=self.dp.target_delta,
                                          sample_rate=self.sample_rate, steps=self.steps * rounds)
        else:
            self.sigma = float(self.dp.noise_multiplier)
        log.info("DP-SGD: sigma=%.3f for epsilon=%g, delta=%g over %d rounds x %d steps at sample rate %.4f; "
                 "spent so far: epsilon=%.3f", self.sigma, self.dp.target_epsilon, self.dp.target_delta, rounds,
                 self.steps, self.sample_rate, self.ledger.epsilon())

    def budget_left(self) -> bool:
        assert self.ledger is not None
        return not self.ledger.would_exceed(noise_multiplier=self.sigma, sample_rate=self.sample_rate,
                                            steps=self.steps, target_epsilon=self.dp.target_epsilon)

    def matches(self, welcome: Welcome) -> bool:
        return welcome.run_id == self.run_id and welcome.spec == self.spec

    def _load_global(self, params: dict[str, np.ndarray]) -> None:
        if set(params) != set(self.shared):
            raise RemoteProtocolError("coordinator sent parameters that are not this model's shared set")
        state = self.model.state_dict()
        for k in self.shared:
            if tuple(params[k].shape) != tuple(state[k].shape):
                raise RemoteProtocolError(f"coordinator sent {k} with shape {params[k].shape}")
        # Only shared tensors are replaced; FedBN's local normalisation layers stay as they are.
        self.model.load_state_dict({k: torch.from_numpy(params[k]) for k in self.shared}, strict=False)

    def train(self, ins: FitIns) -> tuple[dict[str, np.ndarray], TrainResult]:
        """Train from the global parameters; returns ``local - global`` per shared tensor, in ``ins.params`` order."""
        self._load_global(ins.params)
        result = self._train_private(ins) if self.ledger is not None else self._train_plain(ins)
        state = self.model.state_dict()
        delta = {k: state[k].detach().cpu().numpy().astype(np.float32) - ins.params[k] for k in ins.params}
        return delta, result

    def _train_plain(self, ins: FitIns) -> TrainResult:
        t = self.train_cfg
        return train_local(
            self.model, self.data.train, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
            optimizer=t.optimizer, momentum=t.momentum, weight_decay=t.weight_decay,
            mu=float(ins.config.get("mu", 0.0)), augment=t.augment, seed=int(ins.config.get("seed", 0)),
            device=self.device, task=self.data.task,
        )

    def _train_private(self, ins: FitIns) -> TrainResult:
        assert self.ledger is not None
        if not self.budget_left():
            raise BudgetExhausted(self.ledger.epsilon(), self.dp.target_epsilon)
        t = self.train_cfg
        mu = float(ins.config.get("mu", 0.0))
        anchor = {k: torch.from_numpy(ins.params[k]).to(self.device) for k in ins.params} if mu > 0 else None
        r = train_dp(
            self.model, self.data.train, epochs=t.local_epochs, expected_batch=t.batch_size, lr=t.lr,
            optimizer=t.optimizer, momentum=t.momentum, noise_multiplier=self.sigma,
            max_grad_norm=self.dp.max_grad_norm, mu=mu, anchor=anchor, augment=t.augment,
            multiplicity=self.dp.augmentation_multiplicity,
            seed=int(ins.config.get("seed", 0)), device=self.device, task=self.data.task,
        )
        eps = self.ledger.record(ins.round, noise_multiplier=r.noise_multiplier, sample_rate=r.sample_rate,
                                 steps=r.steps)
        log.info("round %d: DP-SGD %d steps, epsilon spent %.3f of %g", ins.round, r.steps, eps,
                 self.dp.target_epsilon)
        return TrainResult(num_samples=r.num_samples, loss=r.loss, steps=r.steps)

    def privacy_metrics(self) -> dict[str, float]:
        if self.ledger is None:
            return {}
        return {"epsilon": self.ledger.epsilon(), "noise_multiplier": self.sigma}

    def fit(self, ins: FitIns) -> FitRes:
        """The plaintext update (secure aggregation off): ``n * delta`` and ``n``."""
        delta, result = self.train(ins)
        n = result.num_samples
        update = {k: (n * v).astype(np.float32) for k, v in delta.items()}
        return FitRes(ins.round, ins.attempt, update, n, {"train_loss": result.loss, "steps": result.steps})

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        self._load_global(ins.params)
        split = self.data.val if ins.split == "val" else self.data.test
        res = evaluate(self.model, split, device=self.device, task=self.data.task)
        predictions = {}
        if ins.split == "test":
            predictions = {"scores": res.scores.astype(np.float32), "labels": np.ascontiguousarray(res.labels)}
        metrics = {**res.metrics(), **self.privacy_metrics()}
        return EvaluateRes(ins.round, ins.split, res.num_examples, metrics, predictions)


def _pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was requested but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


class _Session:
    def __init__(
        self, cfg: SiteConfig, conn: Connection, worker_box: dict[str, Any], faults: FaultPlan, identity: Identity
    ):
        self.cfg = cfg
        self.identity = identity
        self.conn = conn
        self.box = worker_box
        self.faults = faults
        self.final = False
        self._ended = False
        self.error: BaseException | None = None
        self._round_started: dict[tuple[int, int], anyio.Event] = {}
        self._stage_timeout = 60.0

    async def run(self) -> None:
        first = await self.conn.receive()
        if not isinstance(first, Welcome):
            raise RemoteProtocolError(f"expected Welcome, got {type(first).__name__}")
        worker = self.box.get("worker")
        if worker is None or not worker.matches(first):
            worker = await anyio.to_thread.run_sync(SiteWorker, self.cfg, first)
            self.box["worker"] = worker
        log.info("joined run %s as site index %d of %d", first.run_id, first.site_index, first.num_sites)
        self._setup_secagg(first)
        self._stage_timeout = float(first.spec.get("secagg_stage_timeout", 60.0))
        interval = float(first.spec.get("heartbeat_interval", 5.0))
        idle = float(first.spec.get("heartbeat_timeout", 30.0))
        send, recv = anyio.create_memory_object_stream[Message](16)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._guard, tg, self._reader, send, idle)
            tg.start_soon(self._guard, tg, self._heartbeat, interval)
            tg.start_soon(self._guard, tg, self._worker, recv, worker)
        # A final Shutdown is the answer, even when the coordinator's hang-up right after it
        # reached the reader first.
        if self.error is not None and not self.final:
            raise self.error

    async def _guard(self, tg: anyio.abc.TaskGroup, fn: Any, *args: Any) -> None:
        """Whichever task ends first ends the session; the first error is what the session reports."""
        try:
            await fn(*args)
        except (ConnectionLost, RemoteProtocolError, TimeoutError) as exc:
            if self.error is None:
                self.error = exc
        tg.cancel_scope.cancel()

    def _setup_secagg(self, welcome: Welcome) -> None:
        """One secure-aggregation machine per run, kept across reconnects (it remembers past rounds)."""
        sa = welcome.spec.get("secagg", {})
        if not sa.get("enabled"):
            self.box.pop("secagg", None)
            return
        existing = self.box.get("secagg")
        if isinstance(existing, ClientStateMachine) and existing.run_id == welcome.run_id:
            return
        if self.cfg.peers is not None:
            peers = {int(k): PublicIdentity.from_hex(v) for k, v in self.cfg.peers.items()}
        else:
            log.warning(
                "secure aggregation: other sites' identity keys come from the coordinator's roster; pin them "
                "with `peers` in the site config to be safe against a coordinator that substitutes keys"
            )
            peers = {int(i): PublicIdentity.from_hex(k) for i, k in welcome.spec.get("roster", [])}
        self.box["secagg"] = ClientStateMachine(
            site_id=self.cfg.site_id, identity=self.identity, run_id=welcome.run_id, peers=peers,
            min_survivors=int(welcome.spec.get("min_clients", 2)),
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

    async def _worker(self, recv: MemoryObjectReceiveStream[Message], worker: SiteWorker) -> None:
        secure = self.box.get("secagg")
        async with anyio.create_task_group() as tg:
            async for msg in recv:
                await self._handle(msg, worker, secure, tg)
                if self.final or self._ended:
                    tg.cancel_scope.cancel()
                    return

    async def _handle(self, msg: Message, worker: SiteWorker, secure: Any, tg: anyio.abc.TaskGroup) -> None:
        if isinstance(msg, FitIns):
            if self.faults.kill_at_fit == msg.round:
                log.error("fault injection: killing this site in round %d", msg.round)
                os.kill(os.getpid(), signal.SIGKILL)
            if secure is not None:
                # Key set-up messages keep flowing while we train; the update is masked when ready.
                tg.start_soon(self._train_secure, msg, worker, secure, tg)
                return
            t0 = time.monotonic()
            try:
                res = await anyio.to_thread.run_sync(worker.fit, msg)
            except BudgetExhausted as exc:
                await self._decline(msg, exc)
                return
            log.info("round %d: trained on %d samples in %.1fs", msg.round, res.num_samples, time.monotonic() - t0)
            self.conn.pool.release(msg.params.values())  # copied into the model; reuse for the next round
            await self.conn.send(res)
        elif isinstance(msg, SECAGG_TO_SITE):
            if secure is None:
                raise RemoteProtocolError("secure-aggregation message, but this run has it off")
            if isinstance(msg, ShareDelivery) and self.faults.kill_after_share == msg.round:
                log.error("fault injection: killing this site after it shared keys in round %d", msg.round)
                os.kill(os.getpid(), signal.SIGKILL)
            await self._secure_step(secure, lambda: secure.receive(msg))
            if isinstance(msg, SecAggStart):
                self._started_event(msg.round, msg.attempt).set()
        elif isinstance(msg, EvaluateIns):
            res_eval = await anyio.to_thread.run_sync(worker.evaluate, msg)
            self.conn.pool.release(msg.params.values())
            await self.conn.send(res_eval)
        elif isinstance(msg, RoundAborted):
            log.warning("round %d attempt %d aborted: %s", msg.round, msg.attempt, msg.reason)
        elif isinstance(msg, Shutdown):
            log.info("coordinator says: %s", msg.reason)
            self.final = msg.final
            self._ended = True
        else:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the coordinator")

    async def _decline(self, ins: FitIns, exc: BudgetExhausted) -> None:
        log.warning("round %d: declining: %s", ins.round, exc)
        self.conn.pool.release(ins.params.values())
        await self.conn.send(Decline(ins.round, ins.attempt, str(exc), True))

    def _started_event(self, rnd: int, attempt: int) -> anyio.Event:
        return self._round_started.setdefault((rnd, attempt), anyio.Event())

    async def _secure_step(self, secure: ClientStateMachine, step: Any) -> None:
        try:
            replies = step()
        except SecAggRefused as exc:
            log.warning("secure aggregation: leaving this round: %s", exc)
            return
        for reply in replies:
            await self.conn.send(reply)

    async def _train_secure(
        self, ins: FitIns, worker: SiteWorker, secure: ClientStateMachine, tg: anyio.abc.TaskGroup
    ) -> None:
        try:
            t0 = time.monotonic()
            try:
                delta, result = await anyio.to_thread.run_sync(worker.train, ins)
            except BudgetExhausted as exc:
                await self._decline(ins, exc)
                return
            self.conn.pool.release(ins.params.values())
            log.info("round %d: trained on %d samples in %.1fs", ins.round, result.num_samples, time.monotonic() - t0)
            # The round's SecAggStart follows FitIns; wait for it rather than race it.
            with anyio.move_on_after(self._stage_timeout):
                await self._started_event(ins.round, ins.attempt).wait()
            if secure.round_key != (ins.round, ins.attempt):
                log.warning("round %d.%d moved on while training; update discarded", ins.round, ins.attempt)
                return
            await self._secure_step(secure, lambda: secure.set_input(flatten(delta), result.num_samples))
            if secure.clipped:
                log.info("secure aggregation: %d update values were clipped", secure.clipped)
        except (ConnectionLost, RemoteProtocolError) as exc:
            if self.error is None:
                self.error = exc
            tg.cancel_scope.cancel()


async def run_client(cfg: SiteConfig, *, faults: FaultPlan = FaultPlan()) -> int:
    """Run until the coordinator ends the federation (0), or refuses us / stays away too long (1)."""
    identity = Identity.load(cfg.identity_key)
    coordinator = PublicIdentity.from_hex(cfg.coordinator.public_key)
    torch.set_num_threads(cfg.threads)
    box: dict[str, Any] = {}  # the SiteWorker and the secure-aggregation machine, kept across reconnects
    delay = cfg.reconnect.initial_s
    last_ok = time.monotonic()
    while True:
        try:
            with anyio.fail_after(30):
                stream = await anyio.connect_tcp(cfg.coordinator.host, cfg.coordinator.port)
        except (OSError, TimeoutError) as exc:
            log.info("coordinator %s:%d not reachable (%s)", cfg.coordinator.host, cfg.coordinator.port, exc)
        else:
            async with stream:
                try:
                    with anyio.fail_after(30):
                        conn = await connect_handshake(
                            stream, identity, cfg.site_id, coordinator, max_frame_size=cfg.max_frame_bytes,
                            max_payload_bytes=cfg.max_message_bytes, chunk_bytes=cfg.chunk_bytes,
                        )
                    log.info("connected to coordinator %s (key %s)", conn.peer, coordinator.fingerprint())
                    session = _Session(cfg, conn, box, faults, identity)
                    await session.run()
                    if session.final:
                        return 0
                except SiteRefused as exc:
                    log.error("the coordinator refused this site: %s", exc)
                    return 1
                except AuthenticationFailed:
                    log.error("the coordinator failed to prove its identity key; not connecting")
                    return 1
                except (ConnectionLost, RemoteProtocolError, TimeoutError) as exc:
                    log.warning("connection to the coordinator ended: %s", exc or type(exc).__name__)
                last_ok = time.monotonic()
                delay = cfg.reconnect.initial_s
        if time.monotonic() - last_ok > cfg.reconnect.give_up_s:
            log.error("no coordinator for %.0fs; giving up", cfg.reconnect.give_up_s)
            return 1
        # Backoff with jitter, so sites that lost the coordinator together don't return together.
        await anyio.sleep(delay * (0.5 + random.random()))
        delay = min(cfg.reconnect.max_s, delay * 2)

