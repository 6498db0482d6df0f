"""What binds a secure-aggregation round: the round digest, and the texts the sites sign.

A coordinator running modified code could otherwise run a different round at each site: another
quantisation plan, another global model, another training spec, another graph or threshold.
Each site hashes the round *as it received it* into the round digest ``D`` and signs ``D`` in its
key advertisement and in its survivor-list signature.  A peer that received anything else
computes another ``D``, the signature does not verify for it, and it refuses the round before
any share leaves.  ``D`` is also part of the round context ``ctx``, so every share key, share
ciphertext and pairwise mask seed is tied to it as well.

Everything here is specified byte for byte in ``protocol/SPEC.md`` §6 and pinned by
``protocol/vectors/binding.json``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from ..params import summed_layout
from ..wire.crypto import blake2b, blake2b_chunks
from .plan import QuantPlan
from .rules import SecAggSettings, quorum, ring_plan, sharing_group

__all__ = [
    "RoundParams",
    "quorum",
    "canonical",
    "keys_message",
    "params_digest",
    "spec_digest",
    "survivors_message",
    "vector_len",
]


def _sorted(value: Any) -> Any:
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("canonical maps have string keys")
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("canonical floats are finite")
        return value
    if value is None or isinstance(value, bool | int | str | bytes):
        return value
    raise TypeError(f"{type(value).__name__} has no canonical encoding")


def canonical(value: Any) -> bytes:
    """msgpack with map keys in ascending order, floats as float64, bin for bytes, str for text.

    Two parties that decoded equal values get equal bytes, whatever order the sender used.
    """
    return msgpack.packb(_sorted(value), use_bin_type=True, use_single_float=False)


def params_digest(params: Mapping[str, np.ndarray]) -> bytes:
    """``H("asagiri-params", canonical([[name, dtype, shape], ...]) || tensor bytes ...)``, names ascending."""
    names = sorted(params)
    arrays = [np.ascontiguousarray(params[k]) for k in names]
    head = canonical([[k, a.dtype.str, list(a.shape)] for k, a in zip(names, arrays, strict=True)])
    return blake2b_chunks([head, *(memoryview(a.reshape(-1).view(np.uint8)) for a in arrays)], person=b"asagiri-params")


def vector_len(params: Mapping[str, np.ndarray], *, controls: bool = False) -> int:
    """What a round sums for a model (SPEC §6.3): every value of its tensors, under SCAFFOLD
    (``controls``) a control variate for each value of its trained tensors, and the count slot."""
    return sum(int(a.size) for a in summed_layout(dict(params), controls=controls).values()) + 1


def spec_digest(spec: Mapping[str, Any]) -> bytes:
    """``H("asagiri-spec", canonical(spec))`` of Welcome's spec as received."""
    return blake2b(canonical(spec), person=b"asagiri-spec")


@dataclass(frozen=True)
class RoundParams:
    """Every parameter of one round attempt that the sites must agree on."""

    run_id: str
    round: int
    attempt: int
    participants: tuple[int, ...]
    vector_len: int
    plan: QuantPlan
    prg: str
    degree: int  # 0: the complete graph
    threshold: int
    params_digest: bytes  # of the FitIns global parameters
    fit_config: Mapping[str, Any]  # FitIns.config
    spec_digest: bytes  # of Welcome.spec
    colluders: int = 0  # the spec's secagg.colluders (bound through spec_digest, not hashed again)
    digest: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "participants", tuple(sorted(self.participants)))
        p = self.plan
        body = canonical([
            self.run_id, self.round, self.attempt, list(self.participants), self.vector_len,
            [p.bits, float(p.clip), float(p.scale), p.max_samples, p.max_sites], self.prg, self.degree,
            self.threshold, self.params_digest, dict(self.fit_config), self.spec_digest,
        ])
        object.__setattr__(self, "digest", blake2b(body, person=b"asagiri-round"))

    @classmethod
    def derive(
        cls, *, run_id: str, round: int, attempt: int, participants: Sequence[int], secagg: SecAggSettings,
        params_digest: bytes, fit_config: Mapping[str, Any], vector_len: int, spec_digest: bytes,
    ) -> RoundParams:
        """The round every party derives from the spec's ``secagg`` and the participant count
        (protocol/SPEC.md §6.2).  Raises :class:`QuantisationError` where no plan fits."""
        n = len(participants)
        plan = ring_plan(secagg, n)
        degree, threshold = sharing_group(secagg, n)
        return cls(
            run_id=run_id, round=round, attempt=attempt, participants=tuple(participants), vector_len=vector_len,
            plan=plan, prg=secagg.prg, degree=degree or 0, threshold=threshold, params_digest=params_digest,
            fit_config=fit_config, spec_digest=spec_digest, colluders=getattr(secagg, "colluders", 0),
        )

    @property
    def context(self) -> bytes:
        """``ctx = run_id || 0x00 || u32 round || u32 attempt || D``: the domain of every derived key."""
        return self.run_id.encode() + b"\0" + struct.pack(">II", self.round, self.attempt) + self.digest

    @property
    def quorum(self) -> int:
        """Survivor-list signatures every site needs under the spec's ``colluders`` (``rules.quorum``)."""
        return quorum(len(self.participants), self.colluders)


def _ids(ids: Sequence[int]) -> bytes:
    return struct.pack(">I", len(ids)) + b"".join(struct.pack(">I", i) for i in sorted(ids))


def keys_message(ctx: bytes, site: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a site signs when it advertises its two round keys."""
    return b"asagiri-secagg-keys\0" + ctx + struct.pack(">I", site) + c_pk + s_pk


def survivors_message(ctx: bytes, survivors: Sequence[int], masked_with: Sequence[int]) -> bytes:
    """What a site signs at the consistency check: the survivor list, and whom it masked with."""
    return b"asagiri-secagg-survivors\0" + ctx + _ids(survivors) + _ids(masked_with)
