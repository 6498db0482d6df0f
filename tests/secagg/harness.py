"""n site state machines and one coordinator machine linked in memory (``asagiri.secagg.inmemory``),
with the knobs the tests turn by name."""

from __future__ import annotations

from functools import partial

import numpy as np

from asagiri.config import PolicyConfig, SecAggConfig
from asagiri.policy import SitePolicy
from asagiri.secagg.inmemory import STAGES, LocalRound
from asagiri.secagg.prg import DEFAULT_PRG, Prg
from asagiri.wire.crypto import Identity
from asagiri.wire.messages import MaskedInput, ShareKeys

RUN = "test-run"

__all__ = ["RUN", "STAGES", "Federation", "masked_vectors", "random_inputs", "ring_inputs", "share_messages"]


class Federation(LocalRound):
    def __init__(self, n: int, *, dim: int, degree: int | None = None, threshold: int | None = None,
                 min_clients: int = 2, bits: int = 32, clip: float = 1.0, max_samples: int = 1000,
                 rnd: int = 1, attempt: int = 1, identities: dict[int, Identity] | None = None,
                 prg: Prg = DEFAULT_PRG, policy: PolicyConfig | None = None, clients=None, fit_for=None,
                 batches: list[list[int]] | None = None):
        secagg = SecAggConfig(
            mode="complete" if degree is None else "sparse", shares=None if degree is None else degree + 1,
            threshold=threshold, bits=bits, clip=clip, max_samples_per_site=max_samples, prg=prg, batches=batches,
        )
        super().__init__(ids=list(range(1, n + 1)), dim=dim, secagg=secagg, identities=identities, run_id=RUN,
                         rnd=rnd, attempt=attempt, min_clients=min_clients, clients=clients,
                         policy=partial(SitePolicy, policy or PolicyConfig(min_participants=min_clients, min_group=2)),
                         fit_for=fit_for)

    def run(self, inputs, drops=None):
        return self.deliver(inputs, drops)


def random_inputs(ids, dim, rng, *, scale=0.5, max_n=100):
    return {i: (rng.uniform(-scale, scale, dim).astype(np.float32), int(rng.integers(1, max_n + 1))) for i in ids}


def ring_inputs(ids, dim, rng, *, bits=32):
    """Ring vectors of ``dim + 1`` values that no sum over ``ids`` can wrap, as the quantiser's
    plan guarantees (SPEC §6.2): the verified sum checks the sum over the integers (§6.8)."""
    bound = (2 ** (bits - 1) - 1) // len(ids)
    ring = np.uint32 if bits == 32 else np.uint64
    return {i: rng.integers(-bound, bound + 1, dim + 1, dtype=np.int64).astype(ring) for i in ids}


def masked_vectors(fed: Federation) -> dict[int, np.ndarray]:
    return {s: m.vector["y"] for s, m in fed.sent if isinstance(m, MaskedInput)}


def share_messages(fed: Federation) -> dict[int, ShareKeys]:
    return {s: m for s, m in fed.sent if isinstance(m, ShareKeys)}
