"""n site state machines and one coordinator machine linked by an in-memory "network"."""

from __future__ import annotations

import numpy as np

from asagiri.secagg.client import ClientStateMachine, SecAggRefused
from asagiri.secagg.prg import DEFAULT_PRG, Prg
from asagiri.secagg.quantize import QuantPlan
from asagiri.secagg.server import ServerStage, ServerStateMachine
from asagiri.wire.crypto import Identity
from asagiri.wire.messages import MaskedInput, ShareKeys

RUN = "test-run"
STAGES = ("advertise", "share", "masked_input", "consistency", "unmask")


class Federation:
    def __init__(self, n: int, *, dim: int, degree: int | None = None, threshold: int | None = None,
                 min_clients: int = 2, bits: int = 32, clip: float = 1.0, max_samples: int = 1000,
                 rnd: int = 1, attempt: int = 1, identities: dict[int, Identity] | None = None,
                 prg: Prg = DEFAULT_PRG):
        self.ids = list(range(1, n + 1))
        self.identities = identities or {i: Identity.generate() for i in self.ids}
        pubs = {i: k.public for i, k in self.identities.items()}
        self.clients = {
            i: ClientStateMachine(site_id=i, identity=self.identities[i], run_id=RUN, peers=pubs,
                                  min_survivors=min_clients)
            for i in self.ids
        }
        self.plan = QuantPlan.plan(bits=bits, clip=clip, max_samples=max_samples, max_sites=n)
        self.dim = dim
        self.server = ServerStateMachine(
            run_id=RUN, rnd=rnd, attempt=attempt, participants=self.ids, min_clients=min_clients,
            plan=self.plan, vector_len=dim + 1, identities=pubs, degree=degree, threshold=threshold, prg=prg,
        )
        self.dead: set[int] = set()
        self.sent: list[tuple[int, object]] = []  # everything sites sent, for inspection
        self.refusals: dict[int, str] = {}

    def stage(self) -> ServerStage:
        return self.server.stage

    def advance(self, inputs, until: ServerStage) -> list:
        """Deliver honestly until the server enters ``until``; returns its undelivered messages."""
        queue = list(self.server.start())
        pending = dict(inputs)
        while queue and self.server.stage is not until:
            out = queue.pop(0)
            client = self.clients[out.site]
            replies = client.receive(out.msg)
            if out.site in pending and client.stage.value == "ready":
                replies += client.set_quantized(pending.pop(out.site))
            for reply in replies:
                self.sent.append((out.site, reply))
                queue += self.server.receive(out.site, reply)
        assert self.server.stage is until, self.server.stage
        return queue

    def run(self, inputs: dict[int, np.ndarray | tuple[np.ndarray, int]], drops: dict[str, set[int]] | None = None):
        """Run the protocol to the end. ``inputs``: a ring vector, or (float update, sample count).

        ``drops[stage]``: sites that vanish as that stage begins. When nothing is left to deliver,
        the stage times out, as the runtime's deadline would.
        """
        drops = drops or {}
        queue = list(self.server.start())
        pending = dict(inputs)
        while not self.server.finished:
            if not queue:
                queue = self.server.stage_timed_out()
                continue
            out = queue.pop(0)
            for s in sorted(drops.get(self.server.stage.value, set()) - self.dead):
                self.dead.add(s)
                queue += self.server.site_lost(s)
            if out.site in self.dead:
                continue
            client = self.clients[out.site]
            try:
                replies = client.receive(out.msg)
                if out.site in pending and client.stage.value == "ready":
                    given = pending.pop(out.site)
                    replies += client.set_quantized(given) if isinstance(given, np.ndarray) else client.set_input(*given)
            except SecAggRefused as exc:
                self.refusals[out.site] = str(exc)
                continue
            for reply in replies:
                self.sent.append((out.site, reply))
                queue += self.server.receive(out.site, reply)
        return self.server

def random_inputs(ids, dim, rng, *, scale=0.5, max_n=100):
    return {i: (rng.uniform(-scale, scale, dim).astype(np.float32), int(rng.integers(1, max_n + 1))) for i in ids}


def masked_vectors(fed: Federation) -> dict[int, np.ndarray]:
    return {s: m.vector["y"] for s, m in fed.sent if isinstance(m, MaskedInput)}


def share_messages(fed: Federation) -> dict[int, ShareKeys]:
    return {s: m for s, m in fed.sent if isinstance(m, ShareKeys)}
