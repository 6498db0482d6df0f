"""The coordinator over the network: an anyio server that authenticates sites and serves their
sessions, with the federation driver (``driver.py``) running the rounds.

Resource handling: the listener, the metrics endpoint, every site session and the driver are
tasks of one task group owned by :meth:`Coordinator.run`; each session owns its socket and a
cancel scope the driver can cancel to drop the site (``sessions.py``).

Error handling: anything a site can cause (a malformed, unauthenticated, oversized or out-of-stage
message; silence past the heartbeat timeout; a reset) closes that site's channel, is logged, and
reaches the round as ``SiteLost``.  The coordinator itself never stops for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry

from ..config import FederationConfig, config_digest
from ..faults import NO_FAULTS, FaultPlan
from ..observe.events import Event, SiteJoined
from ..observe.metrics import CoordinatorMetrics
from ..observe.recorder import CHECKPOINT_NAME, Recorder
from ..params import Params
from ..promhttp import metrics_listener, serve_metrics
from ..wire.channel import SiteRefused
from ..wire.connection import accept_handshake
from ..wire.crypto import Identity
from ..wire.errors import ConnectionLost, RemoteProtocolError
from ..wire.pool import ArrayPool
from .driver import FederationDriver, FederationFailed, ResumeError
from .sessions import Sessions

__all__ = ["Coordinator", "FederationFailed", "ResumeError"]

log = logging.getLogger(__name__)


class Coordinator:
    """``run`` serves the federation described by ``cfg``, from the round-0 model ``initial``
    (``asagiri.initial.initial_params``); ``console`` prints progress lines."""

    def __init__(self, cfg: FederationConfig, *, initial: Params, resume: bool = False, faults: FaultPlan = NO_FAULTS,
                 console: bool = True, watchers: Sequence[Callable[[Event], None]] = ()) -> None:
        self.cfg = cfg
        self.identity = Identity.load(cfg.identity_key)
        self.run_dir = cfg.run_dir
        self.registry = CollectorRegistry()
        self.metrics = CoordinatorMetrics(self.registry)
        self.sessions = Sessions(cfg.timeouts, self.metrics, capacity=8 * len(cfg.sites))
        self.recorder = Recorder(
            self.run_dir, self.metrics, run_id=cfg.run_id, rounds=cfg.rounds, identity=self.identity,
            config_sha256=config_digest(cfg), epsilon_target=cfg.dp.target_epsilon if cfg.dp.enabled else None,
            console=console, keep_models=cfg.keep_models,
        )
        self.watchers = list(watchers)  # besides the recorder: a status pipe, a test, an attack harness
        self.driver = FederationDriver(cfg, self.sessions, self._emit, initial=initial,
                                       checkpoint=self.run_dir / CHECKPOINT_NAME,
                                       resume=resume, faults=faults, round_record=lambda: self.recorder.latest_record,
                                       abort_record=lambda: self.recorder.latest_abort)
        # One receive pool for every session: a few model-sized buffers, however many sites.
        self._pool = ArrayPool(max_bytes=4 * self.driver.model_bytes)
        self.port: int | None = None

    def _emit(self, event: Event) -> None:
        self.recorder(event)
        for watch in self.watchers:
            watch(event)

    async def run(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> dict[str, Any]:
        """Serve until the federation ends; returns the summary. The bound port goes to ``task_status``."""
        listener = await anyio.create_tcp_listener(local_host=self.cfg.listen.host, local_port=self.cfg.listen.port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        # bound before any task starts: a taken port is then a plain OSError, a configuration error
        metrics = None if self.cfg.metrics_port is None else \
            await metrics_listener(self.cfg.listen.host, self.cfg.metrics_port)
        async with anyio.create_task_group() as tg:
            if metrics is not None:
                metrics_port = await tg.start(partial(serve_metrics, listener=metrics), self.registry,
                                              self.cfg.listen.host, self.cfg.metrics_port)
                log.info("Prometheus metrics on http://%s:%d/metrics", self.cfg.listen.host, metrics_port)
            tg.start_soon(listener.serve, self.accept, tg)
            task_status.started(self.port)
            summary = await self.federate()
            tg.cancel_scope.cancel()
        return summary

    async def federate(self) -> dict[str, Any]:
        """Run the rounds with whichever sites ``accept`` serves; tell them when it is over."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        summary: dict[str, Any] = {}
        try:
            summary = await self.driver.run()
        finally:
            await self.sessions.shutdown(summary.get("status", "stopped"))
        return summary

    async def accept(self, stream: anyio.abc.ByteStream) -> None:
        """Authenticate one site on ``stream`` (TCP, or in memory), welcome it and serve its session."""
        cfg = self.cfg
        async with stream:
            try:
                with anyio.fail_after(cfg.timeouts.handshake):
                    site_id, conn = await accept_handshake(
                        stream, self.identity, self.driver.roster, max_frame_size=cfg.max_frame_bytes,
                        max_payload_bytes=cfg.max_message_bytes, chunk_bytes=cfg.chunk_bytes, pool=self._pool,
                    )
                    await conn.send(self.driver.welcome(site_id))
                    # The newest round's record, so a site that missed it (reconnected, or the run
                    # resumed) holds it before any later round asks it to train (SPEC §9).
                    if (record := self.driver.round_record_message()) is not None:
                        await conn.send(record)
            except SiteRefused as exc:
                self.metrics.refused.labels("handshake").inc()
                log.warning("refused a connection: %s", exc)
                return
            except (RemoteProtocolError, ConnectionLost, TimeoutError) as exc:
                self.metrics.protocol_violations.labels("handshake").inc()
                log.warning("handshake failed: %s", exc or type(exc).__name__)
                return
            fingerprint = self.driver.roster[site_id].fingerprint()
            log.info("site %d proved its enrolled key %s", site_id, fingerprint)  # as `asagiri fingerprint` prints it
            self._emit(SiteJoined(site_id, fingerprint))
            await self.sessions.serve(site_id, conn)
