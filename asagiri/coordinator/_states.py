"""The round machine's phases and transitions, as data (``round.py`` looks them up).

As in ``secagg/_states.py`` (h11's ``_state.py`` rules): every phase change of
:class:`~asagiri.coordinator.round.RoundMachine` is an entry ``{(phase, event type): next phase}``
of one of the two tables here, chosen by whether the round runs secure aggregation; a message the
table does not take in the current phase is a :class:`~asagiri.coordinator.round.ProtocolViolation`
(or, when it answers an earlier round or attempt, ignored).  protocol/SPEC.md §5 draws both tables
(``python -m protocol.tools.state_diagrams``).

Theory of operation (what does not fit in a table):

- ``site_lost`` and ``timed_out`` are taken in every phase; they move no phase themselves, but may
  close the current one (``FitClosed``, ``FitFailed``, ``EvaluationClosed``).
- Under secure aggregation the FIT messages go to the embedded ``secagg/server.py`` machine (its
  own table), and FIT closes when that machine is DONE (``FitClosed``) or ABORTED (``FitFailed``).
  A plaintext ``FitRes`` is then refused outright.
- A message the table takes is still refused when its sender is not one the phase waits for (a
  second answer, or a site that was not asked).
"""

from __future__ import annotations

import enum

from ..wire.messages import (
    AdvertiseKeys,
    ConsistencySig,
    Decline,
    EvaluateRes,
    FitRes,
    MaskedInput,
    ShareKeys,
    SumVouch,
    UnmaskResponse,
)

__all__ = ["PLAIN_ROUND", "SECAGG_MESSAGES", "SECURE_ROUND", "EvaluationClosed", "FitClosed", "FitFailed", "Phase"]


class Phase(enum.Enum):
    FIT = "fit"
    EVALUATE = "evaluate"
    DONE = "done"
    ABORTED = "aborted"


class FitClosed:
    """Every selected site answered, was lost, or timed out (under secure aggregation: the sum was
    unmasked), with at least ``min_clients`` updates in the sum: the strategy aggregates it."""


class FitFailed:
    """Fewer than ``min_clients`` updates, or secure aggregation aborted: nothing is aggregated, and
    ``RoundAborted`` goes to the sites still in the round."""


class EvaluationClosed:
    """Every site asked to evaluate answered, was lost, or timed out."""


SECAGG_MESSAGES = (AdvertiseKeys, ShareKeys, MaskedInput, ConsistencySig, UnmaskResponse, SumVouch)

_P = Phase

_AFTER_FIT = {
    (_P.FIT, FitClosed): _P.EVALUATE,
    (_P.FIT, FitFailed): _P.ABORTED,
    (_P.EVALUATE, EvaluateRes): _P.EVALUATE,
    (_P.EVALUATE, EvaluationClosed): _P.DONE,
}

PLAIN_ROUND: dict[tuple[Phase, type], Phase] = {
    (_P.FIT, FitRes): _P.FIT,
    (_P.FIT, Decline): _P.FIT,
    **_AFTER_FIT,
}

SECURE_ROUND: dict[tuple[Phase, type], Phase] = {
    **{(_P.FIT, kind): _P.FIT for kind in SECAGG_MESSAGES},
    (_P.FIT, Decline): _P.FIT,
    **_AFTER_FIT,
}
