"""A verified round's sum, checked by a party that was not among its survivors (SPEC §6.9).

Every vouch of a round is signed over ``ctx ‖ c ‖ site ‖ scalars`` (SPEC §6.8), ``c`` hashes the
sum and the survivors, and ``ctx`` follows from what the checker already knows or is told: the
run, the spec, the model the round trained on (its own ``W_t``: a record of a round on any other
model fails), the participants and the fit config.  So a ``SumRecord`` carries the round's
participants, config, survivors, sum and vouches, and anyone holding the pinned site keys checks
that the vouches are the survivors' own and add up to the sum.  A site that missed a round
(it was not a survivor, or not connected) catches up this way, and an auditor replays the run
(``asagiri audit verify --models``).  Nothing in the record is trusted: only the check.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..wire.crypto import AuthenticationFailed, PublicIdentity
from ..wire.messages import SumRecord
from . import verify
from .binding import RoundParams
from .quantize import QuantisationError
from .rules import SecAggSettings
from .verify import VerifiedSum

__all__ = ["RecordRefused", "check_record"]


class RecordRefused(ValueError):
    """The record does not prove its sum (the reason says which check failed)."""


def _require(ok: bool, why: str) -> None:
    if not ok:
        raise RecordRefused(why)


def check_record(record: SumRecord, *, run_id: str, secagg: SecAggSettings, spec_digest: bytes,
                 trained_on: bytes, vector_len: int, peers: Mapping[int, PublicIdentity]) -> VerifiedSum:
    """The record's sum, if every survivor's vouch verifies under its pinned key for the round
    ``ctx`` derived with ``trained_on`` as the model, and the vouches add up to the sum."""
    participants, survivors = sorted(record.participants), sorted(record.survivors)
    _require(bool(survivors) and set(survivors) <= set(participants),
             f"survivors {survivors} are not a non-empty subset of the participants {participants}")
    try:
        params = RoundParams.derive(
            run_id=run_id, round=record.round, attempt=record.attempt, participants=participants, secagg=secagg,
            params_digest=trained_on, fit_config=record.config, vector_len=vector_len, spec_digest=spec_digest)
    except (QuantisationError, ValueError, TypeError) as exc:  # no plan or sharing group for this many
        raise RecordRefused(f"no round of {len(participants)} participants under this spec: {exc}") from None
    total = record.total["s"]
    _require(total.shape == (vector_len,) and total.dtype == params.plan.dtype,
             f"a sum of {total.shape} {total.dtype}; the round sums {vector_len} x {np.dtype(params.plan.dtype)}")
    vouches = {int(site): (scalars, sig) for site, scalars, sig in record.vouches}
    _require(sorted(vouches) == survivors, f"vouches from sites {sorted(vouches)}; the survivors are {survivors}")
    digest, seed, (u, v) = verify.challenge_of(params.context, total, survivors)
    for site, (scalars, sig) in vouches.items():
        peer = peers.get(site)
        _require(peer is not None, f"site {site} has no pinned identity key")
        try:
            peer.verify(verify.vouch_message(params.context, seed, site, scalars), sig)
        except AuthenticationFailed:
            raise RecordRefused(f"site {site}'s vouch does not verify for this round on this model") from None
    (expected,) = verify.project(total, u=u, v=v)
    try:
        vouched = verify.vouched_total((s for s, _ in vouches.values()), params.plan.bits)
    except ValueError as exc:
        raise RecordRefused(str(exc)) from None
    _require(vouched == expected, "the survivors' vouches do not add up to the sum")
    return VerifiedSum(record.round, record.attempt, total, digest, tuple(survivors), params.plan, trained_on)
