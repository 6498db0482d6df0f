"""One secure-aggregation round in memory: the sites' machines and the coordinator's, linked by a
queue instead of a network.  The same state machines the runtime drives, for tests, property
checks and benchmarks (as h11's ``ConnectionPair``).

Each site's policy comes from the caller (``policy``: the pinned keys in, a :class:`~asagiri.secagg.checks.SiteChecks`
out, e.g. ``functools.partial(SitePolicy, PolicyConfig(...))``), as do the ``secagg`` settings
(``config.SecAggConfig``): ``secagg`` imports neither."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import Refusal
from ..wire.crypto import Identity, PublicIdentity
from ..wire.messages import FitIns, Message
from .binding import RoundParams, params_digest, spec_digest
from .checks import SiteChecks
from .client import ClientStateMachine
from .rules import SecAggSettings, batch_map, spec_of
from .server import Outbound, ServerStage, ServerStateMachine

__all__ = ["LocalRound", "STAGES"]

STAGES = ("advertise", "share", "masked_input", "consistency", "unmask", "verify")


@dataclass
class LocalRound:
    """``ids`` sites and a coordinator, one round attempt; ``deliver`` runs it honestly to the end.

    The global model is ``dim`` zeros (only its length and digest matter to the protocol).  Pass
    ``clients`` from an earlier round to keep their memory of past rounds.
    """

    ids: list[int]
    dim: int
    secagg: SecAggSettings
    identities: Mapping[int, Identity] | None = None
    run_id: str = "local"
    rnd: int = 1
    attempt: int = 1
    min_clients: int = 2
    # One site's policy, made from every site's pinned key (unused where ``clients`` is given).
    policy: Callable[[Mapping[int, PublicIdentity]], SiteChecks] | None = None
    clients: dict[int, ClientStateMachine] | None = None
    fit_for: Mapping[int, FitIns] | None = None  # a different FitIns for some sites (an attack)

    def __post_init__(self) -> None:
        self.ids = sorted(self.ids)
        if self.identities is None:
            self.identities = {i: Identity.generate() for i in self.ids}
        pubs = {i: k.public for i, k in self.identities.items()}
        sa = self.secagg
        spec = {"secagg": spec_of(sa)}
        self.spec_digest = spec_digest(spec)
        self.fit = FitIns(self.rnd, self.attempt, {"w": np.zeros(self.dim, np.float32)}, {})
        self.params = RoundParams.derive(
            run_id=self.run_id, round=self.rnd, attempt=self.attempt, participants=self.ids, secagg=sa,
            params_digest=params_digest(self.fit.params), fit_config={}, vector_len=self.dim + 1,
            spec_digest=self.spec_digest,
        )
        self.plan = self.params.plan
        self.server = ServerStateMachine(params=self.params, min_clients=self.min_clients, identities=pubs,
                                         batches=batch_map(getattr(sa, "batches", None)))
        if self.clients is None:
            if self.policy is None:
                raise TypeError("LocalRound: pass policy (pinned keys -> one site's policy) or clients")
            self.clients = {
                i: ClientStateMachine(site_id=i, identity=self.identities[i], run_id=self.run_id, secagg=sa,
                                      spec_digest=self.spec_digest, policy=self.policy(pubs))
                for i in self.ids
            }
        for site, client in self.clients.items():
            client.receive((self.fit_for or {}).get(site, self.fit))
        self.dead: set[int] = set()
        self.sent: list[tuple[int, Message]] = []  # everything the sites sent, for inspection
        self.refusals: dict[int, str] = {}

    def advance(self, inputs: Mapping[int, np.ndarray], until: ServerStage) -> list[Outbound]:
        """Deliver honestly until the coordinator enters ``until``; returns what it has not sent yet."""
        queue = list(self.server.start())
        pending = dict(inputs)
        while queue and self.server.stage is not until:
            out = queue.pop(0)
            for reply in self._step(out, pending):
                self.sent.append((out.site, reply))
                queue += self.server.receive(out.site, reply)
        if self.server.stage is not until:
            raise AssertionError(f"the round is in {self.server.stage}, not {until}")
        return queue

    def deliver(self, inputs: Mapping[int, np.ndarray | tuple[np.ndarray, int]],
                drops: Mapping[str, set[int]] | None = None) -> ServerStateMachine:
        """Run to the end. ``inputs``: a ring vector, or (float update, sample count), per site.

        ``drops[stage]``: sites that vanish as that stage begins.  A site that refuses is recorded
        in ``refusals`` and says nothing more; when nothing is left to deliver the stage times
        out, as the runtime's deadline would.
        """
        drops = drops or {}
        queue = list(self.server.start())
        pending = dict(inputs)
        while queue or not self.server.finished:  # after DONE, the sites check the SumProof
            if not queue:
                queue = self.server.stage_timed_out()
                continue
            out = queue.pop(0)
            for s in sorted(drops.get(self.server.stage.value, set()) - self.dead):
                self.dead.add(s)
                queue += self.server.site_lost(s)
            if out.site in self.dead:
                continue
            try:
                replies = self._step(out, pending)
            except Refusal as exc:
                self.refusals[out.site] = str(exc)
                continue
            for reply in replies:
                self.sent.append((out.site, reply))
                queue += self.server.receive(out.site, reply)
        return self.server

    def _step(self, out: Outbound, pending: dict) -> list[Message]:
        assert self.clients is not None
        client = self.clients[out.site]
        replies = client.receive(out.msg)
        if out.site in pending and client.stage.value == "ready":
            given = pending.pop(out.site)
            if isinstance(given, np.ndarray):
                replies += client.set_quantized(given)
            else:
                replies += client.set_input(*given, trained_on=(self.params.params_digest, {}))
        return replies
