"""A site across its sessions: connect (with backoff), authenticate, serve one session
(``session.py``), and again after the coordinator goes away, until the federation is over.

What the site keeps across sessions (its round machine, with the secure-aggregation machine,
policy, replay guard and receipts it drives, and its worker) lives in
:class:`~asagiri.client.session.Kept`; a refused connection or a failed
coordinator proof is retried like a lost connection.
"""

from __future__ import annotations

import logging
import random
import time
from functools import partial

import anyio
import anyio.abc
import torch
from prometheus_client import CollectorRegistry

from ..config import SiteConfig
from ..faults import NO_FAULTS, FaultPlan
from ..policy import SitePolicy
from ..promhttp import metrics_listener, serve_metrics
from ..signedlog import RECEIPT_DOMAIN, SignedLog
from ..site.metrics import SiteMetrics
from ..site.receipts import RoundWitness
from ..site.worker import SiteWorker
from ..wire.channel import SiteRefused
from ..wire.connection import connect_handshake
from ..wire.crypto import AuthenticationFailed, Identity, PublicIdentity
from ..wire.errors import ConnectionLost, RemoteProtocolError
from .machine import SiteMachine
from .progress import TrainingProgress
from .session import Kept, Session
from .state import PersistentJoinedRuns, PersistentReplayGuard

__all__ = ["Site", "SiteWorker", "run_client"]  # SiteWorker re-exported from asagiri.site

log = logging.getLogger(__name__)


class Site:
    """One site across its sessions: identity, pinned keys, policy, replay guard, and what ``Kept``
    keeps (worker, secure-aggregation machine).  ``session`` serves one connection to the
    coordinator, over TCP or in memory (``asagiri.local``)."""

    def __init__(self, cfg: SiteConfig, *, faults: FaultPlan = NO_FAULTS, progress: bool = False) -> None:
        self.cfg = cfg
        self.faults = faults
        self.identity = Identity.load(cfg.identity_key)
        self.coordinator = PublicIdentity.from_hex(cfg.coordinator.public_key)
        peers = {int(k): PublicIdentity.from_hex(v) for k, v in (cfg.peers or {}).items()}
        policy = SitePolicy(cfg.policy, peers, PersistentJoinedRuns(cfg.state_dir / "run_specs.json"))
        receipts = SignedLog(cfg.state_dir / "receipts.jsonl", self.identity, domain=RECEIPT_DOMAIN)
        witness = RoundWitness(receipts, self.coordinator, cfg.site_id, policy)
        machine = SiteMachine(site_id=cfg.site_id, identity=self.identity, policy=policy,
                              replay=PersistentReplayGuard(cfg.state_dir / "secagg_rounds.json"), witness=witness,
                              trajectory_dir=cfg.state_dir)
        self.kept = Kept(policy, machine, witness, SiteMetrics(CollectorRegistry()),
                         TrainingProgress() if progress else None)
        if cfg.policy.min_participants < 3:
            log.warning("policy.min_participants=%d: a sum of two sites' updates tells each of them the other's",
                        cfg.policy.min_participants)

    @property
    def policy(self) -> SitePolicy:
        return self.kept.policy

    async def session(self, stream: anyio.abc.ByteStream) -> bool:
        """Authenticate on ``stream`` and take part until the session ends; True if the federation is over."""
        cfg = self.cfg
        with anyio.fail_after(cfg.reconnect.connect_s):
            # The configured cap until the site knows the model; its size after (limit_payload).
            conn = await connect_handshake(
                stream, self.identity, cfg.site_id, self.coordinator, max_frame_size=cfg.max_frame_bytes,
                max_payload_bytes=cfg.max_message_bytes, chunk_bytes=cfg.chunk_bytes,
            )
        log.info("connected to the coordinator at %s:%d (key %s)", cfg.coordinator.host, cfg.coordinator.port,
                 self.coordinator.fingerprint())
        session = Session(cfg, conn, self.kept, self.faults)
        await session.run()
        return session.final


async def run_client(cfg: SiteConfig, *, faults: FaultPlan = NO_FAULTS, progress: bool = False,
                     site: Site | None = None) -> int:
    """Run until the coordinator ends the federation (0), or stays away too long (1).

    A ``Reject`` or a failed server proof is logged and retried like a lost connection: both can
    be injected by anyone on the path before the channel is authenticated, so neither may stop
    the site for good.  ``reconnect.give_up_s`` bounds how long the site keeps trying.  ``site``:
    one built beforehand (its state read), so that a caller reports a bad state as it likes.
    """
    torch.set_num_threads(cfg.threads)
    site = site if site is not None else Site(cfg, faults=faults, progress=progress)
    if cfg.metrics_port is None:
        return await _serve_sessions(site)
    metrics = await metrics_listener("127.0.0.1", cfg.metrics_port)  # a taken port: MetricsPortTaken, here
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve_metrics, listener=metrics), site.kept.metrics.registry, "127.0.0.1",
                              cfg.metrics_port)
        log.info("site metrics on http://127.0.0.1:%d/metrics", port)
        code = await _serve_sessions(site)
        tg.cancel_scope.cancel()
    return code


async def _serve_sessions(site: Site) -> int:
    cfg = site.cfg
    delay = cfg.reconnect.initial_s
    last_ok = time.monotonic()
    why = "not reachable"  # the last failure, for the line the site gives up with
    while True:
        try:
            with anyio.fail_after(cfg.reconnect.connect_s):
                stream = await anyio.connect_tcp(cfg.coordinator.host, cfg.coordinator.port)
        except (OSError, TimeoutError) as exc:
            why = f"{cfg.coordinator.host}:{cfg.coordinator.port} not reachable: {exc or type(exc).__name__}"
            log.info("coordinator %s", why)
        else:
            async with stream:
                try:
                    if await site.session(stream):
                        return 0
                    last_ok = time.monotonic()
                    delay = cfg.reconnect.initial_s
                except SiteRefused as exc:
                    why = f"it refused this site ({exc})"
                    log.error("the coordinator refused this site (%s): if site %d is not enrolled, the coordinator's "
                              "operator adds it with key %s to fed.yaml's sites (or re-provisions); if it is, this "
                              "identity_key is not the enrolled one (use the kit's); retrying, since anyone on the "
                              "path can send a refusal", exc, cfg.site_id, site.identity.public.fingerprint())
                except AuthenticationFailed:
                    why = f"it failed to prove the pinned key {site.coordinator.fingerprint()}"
                    log.error("the coordinator failed to prove the pinned key %s (coordinator.public_key): compare "
                              "`asagiri fingerprint` of its coordinator.pub with its operator, or someone is in "
                              "between; retrying", site.coordinator.fingerprint())
                except (ConnectionLost, RemoteProtocolError, TimeoutError) as exc:
                    log.warning("connection to the coordinator ended: %s", exc or type(exc).__name__)
                    last_ok = time.monotonic()
                    delay = cfg.reconnect.initial_s
        if time.monotonic() - last_ok > cfg.reconnect.give_up_s:
            log.error("no coordinator for %.0fs (last: %s); giving up (reconnect.give_up_s)", cfg.reconnect.give_up_s,
                      why)
            return 1
        # Backoff with jitter, so sites that lost the coordinator together don't return together.
        await anyio.sleep(delay * (0.5 + random.random()))
        delay = min(cfg.reconnect.max_s, delay * 2)
