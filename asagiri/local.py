"""A whole federation in one process: the coordinator and every site, linked in memory.

Everything but the socket is the product's own code path, the same as two processes on TCP:
the handshake and encrypted channel (over ``wire.memory``), the coordinator's sessions, driver
and recorder, each site's session, policy, ``SiteWorker`` and secure-aggregation machine.  The
run writes the same files (``metrics.jsonl``, ``audit.jsonl``, ``summary.json``, checkpoint).
Experiments, benchmarks and tests that need a federation but not its processes use this.

    cfg, sites = lay_out(run_dir, sites=4, rounds=3, overrides=["data.dataset=synthetic"])
    summary = anyio.run(run_local, cfg, sites)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import torch

from .client.runtime import Site
from .config import FederationConfig, SiteConfig
from .coordinator.server import Coordinator
from .faults import NO_FAULTS, FaultPlan
from .initial import initial_params
from .launcher import site_configs, write_federation
from .observe.events import Event
from .params import Params
from .wire.errors import ConnectionLost, RemoteProtocolError
from .wire.memory import memory_stream_pair

__all__ = ["lay_out", "run_local"]

log = logging.getLogger(__name__)


def lay_out(run_dir: Path, *, sites: int, rounds: int, overrides: Sequence[str] = (),
            site_extra: Mapping[int, Mapping[str, Any]] | None = None,
            recipe: Mapping[str, Any] | None = None) -> tuple[FederationConfig, dict[int, SiteConfig]]:
    """Keys and configs for a federation of ``sites`` in ``run_dir`` (as ``asagiri demo`` writes
    them), from a recipe's settings (``recipes.load_recipe``) if given, then ``overrides``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _, cfg = write_federation(run_dir, sites=sites, rounds=rounds, overrides=list(overrides), recipe=recipe)
    return cfg, site_configs(run_dir, cfg, extra=site_extra)


async def run_local(cfg: FederationConfig, sites: Mapping[int, SiteConfig], *, resume: bool = False,
                    faults: FaultPlan = NO_FAULTS, console: bool = False,
                    watchers: Sequence[Callable[[Event], None]] = (), initial: Params | None = None) -> dict[str, Any]:
    """Run the federation to its end with ``sites`` in this process; returns the summary.
    ``faults`` apply to the coordinator; a site of ``sites`` that is left out never connects.
    ``initial``: the round-0 model, if not the run's own ``W_0`` (a run in the clear trains on
    whatever the coordinator sends; under secure aggregation the sites accept their own only)."""
    torch.set_num_threads(max(1, min((s.threads for s in sites.values()), default=1)))
    coordinator = Coordinator(cfg, initial=initial_params(cfg) if initial is None else initial, resume=resume, faults=faults, console=console, watchers=watchers)
    async with anyio.create_task_group() as tg:
        for site_cfg in sites.values():
            near, far = memory_stream_pair()
            tg.start_soon(_coordinator_side, coordinator, near)
            tg.start_soon(_site_side, Site(site_cfg), far)
        summary = await coordinator.federate()
        tg.cancel_scope.cancel()
    return summary


async def _coordinator_side(coordinator: Coordinator, stream: anyio.abc.ByteStream) -> None:
    async with stream:
        await coordinator.accept(stream)


async def _site_side(site: Site, stream: anyio.abc.ByteStream) -> None:
    """One session, as a site process would run it; its end is logged, never raised: the
    federation goes on without the site, as it would over TCP."""
    async with stream:
        try:
            await site.session(stream)
        except (ConnectionLost, RemoteProtocolError, TimeoutError) as exc:
            log.warning("site %d: session ended: %s", site.cfg.site_id, exc or type(exc).__name__)
