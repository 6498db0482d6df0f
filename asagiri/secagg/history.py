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

import struct
from collections.abc import Mapping

import numpy as np

from ..errors import Refusal
from ..wire.crypto import PublicIdentity
from ..wire.messages import SumRecord
from . import verify
from .binding import RoundParams
from .checks import SiteChecks
from .quantize import QuantisationError
from .rules import SecAggSettings, batch_map
from .verify import VerifiedSum

__all__ = ["RecordRefused", "check_record"]


class RecordRefused(ValueError):
    """The record does not prove its sum (the reason says which check failed)."""


def _require(ok: bool, why: str) -> None:
    if not ok:
        raise RecordRefused(why)


def check_record(record: SumRecord, *, run_id: str, secagg: SecAggSettings, spec_digest: bytes,
                 trained_on: bytes, vector_len: int, peers: Mapping[int, PublicIdentity],
                 policy: SiteChecks | None = None) -> VerifiedSum:
    """The record's sum, if every survivor's vouch verifies under its pinned key for the round
    ``ctx`` derived with ``trained_on`` as the model, and the vouches add up to the sum.

    ``policy``: the checking site's, whose rules a survivor list must meet as it would in a round
    the site took part in (at least ``min_participants`` plus ``colluders`` survivors, whole
    batches, every one pinned): a record's sum is only as honest as its vouchers, and a site that
    assumes ``colluders`` of them work with the coordinator needs ``min_participants`` others.
    An auditor replaying a run checks the signatures and the sums alone (``None``)."""
    participants, survivors = sorted(record.participants), sorted(record.survivors)
    _require(bool(survivors) and set(survivors) <= set(participants),
             f"survivors {survivors} are not a non-empty subset of the participants {participants}")
    if policy is not None:
        batches = batch_map(getattr(secagg, "batches", None))
        # the run's colluders as well as this site's, as the quorum of a round it takes part in
        floor = policy.cfg.min_participants + max(policy.cfg.colluders, int(getattr(secagg, "colluders", 0)))
        try:
            policy.require(len(survivors) >= floor, "min_participants",
                           f"{len(survivors)} survivors, fewer than min_participants + colluders = {floor}")
            policy.check_participants("participants", participants)
            policy.check_whole_batches("participants", participants, batches)
            policy.check_whole_batches("survivors", survivors, batches)
            policy.check_pinned(participants)
        except Refusal as exc:
            raise RecordRefused(str(exc)) from None
    try:
        params = RoundParams.derive(
            run_id=run_id, round=record.round, attempt=record.attempt, participants=participants, secagg=secagg,
            params_digest=trained_on, fit_config=record.config, vector_len=vector_len, spec_digest=spec_digest)
        ctx = params.context
    except (QuantisationError, ValueError, TypeError, OverflowError, struct.error) as exc:
        raise RecordRefused(f"no round of {len(participants)} participants under this spec: {exc}") from None
    total = record.total["s"]
    _require(total.shape == (vector_len,) and total.dtype == params.plan.dtype,
             f"a sum of {total.shape} {total.dtype}; the round sums {vector_len} x {np.dtype(params.plan.dtype)}")
    vouches = {int(site): (scalars, sig) for site, scalars, sig in record.vouches}
    digest, seed, (u, v) = verify.challenge_of(ctx, total, survivors)
    (expected,) = verify.project(total, u=u, v=v)
    try:
        problem = verify.vouches_problem(vouches, survivors, ctx=ctx, seed=seed, expected=expected,
                                         bits=params.plan.bits, peers=peers)
    except ValueError as exc:  # a vouch's scalars of the other ring's width
        raise RecordRefused(str(exc)) from None
    _require(problem is None, problem[1] if problem is not None else "")
    return VerifiedSum(record.round, record.attempt, total, digest, tuple(survivors), params.plan, trained_on)
