"""One training round as a sans-IO state machine: messages and timeouts in, messages out.

No sockets, no clocks.  The anyio runtime feeds it ``receive(site, msg)``, ``site_lost(site)`` and
``timed_out()`` and sends whatever it returns.  Invariant: an update is applied only when at least
``min_clients`` sites contributed to the sum; otherwise the round is ``ABORTED`` and nothing is
aggregated (``RoundAborted`` goes to the survivors).

Transitions::

    FIT --all selected answered or lost / fit timeout--> EVALUATE  (if >= k updates)
    FIT --... with < k updates-------------------------> ABORTED
    EVALUATE --all evaluators answered or lost / timeout--> DONE
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..strategy.aggregate import RunningSum
from ..strategy.base import Strategy
from ..wire.messages import Decline, EvaluateIns, EvaluateRes, FitIns, FitRes, Message, Params, RoundAborted

__all__ = ["Outbound", "Phase", "ProtocolViolation", "RoundMachine", "RoundOutcome"]


class Phase(enum.Enum):
    FIT = "fit"
    EVALUATE = "evaluate"
    DONE = "done"
    ABORTED = "aborted"


class ProtocolViolation(Exception):
    """A site sent something the round does not allow; the runtime closes that site's channel."""

    def __init__(self, site: int, reason: str) -> None:
        super().__init__(f"site {site}: {reason}")
        self.site = site
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Outbound:
    site: int
    msg: Message


@dataclass
class RoundOutcome:
    round: int
    attempt: int
    selected: list[int]
    participants: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    declined: dict[int, str] = field(default_factory=dict)
    exhausted: list[int] = field(default_factory=list)
    params: Params | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    site_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    abort_reason: str | None = None


class RoundMachine:
    def __init__(
        self,
        *,
        rnd: int,
        attempt: int,
        selected: list[int],
        evaluators: list[int],
        min_clients: int,
        global_params: Params,
        fit_config: dict[str, Any],
        strategy: Strategy,
    ) -> None:
        if len(selected) < min_clients:
            raise ValueError(f"selected {len(selected)} sites, fewer than min_clients={min_clients}")
        self.round = rnd
        self.attempt = attempt
        self.min_clients = min_clients
        self.phase = Phase.FIT
        self._params = global_params
        self._fit_config = fit_config
        self._strategy = strategy
        self._waiting: set[int] = set(selected)
        self._evaluators = set(evaluators)
        self._lost: set[int] = set()
        self._sum = RunningSum(global_params)
        self._eval_results: dict[int, tuple[int, dict[str, float]]] = {}
        self.outcome = RoundOutcome(round=rnd, attempt=attempt, selected=sorted(selected))

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.ABORTED)

    def start(self) -> list[Outbound]:
        return [
            Outbound(s, FitIns(self.round, self.attempt, self._params, dict(self._fit_config)))
            for s in sorted(self._waiting)
        ]

    # -- events ----------------------------------------------------------------------------------

    def receive(self, site: int, msg: Message) -> list[Outbound]:
        if isinstance(msg, FitRes | Decline):
            if (msg.round, msg.attempt) != (self.round, self.attempt):
                if (msg.round, msg.attempt) < (self.round, self.attempt):
                    return []  # a late answer to an earlier round or attempt: harmless, ignored
                raise ProtocolViolation(site, f"answer for round {msg.round}.{msg.attempt} that was never asked")
            if self.phase is not Phase.FIT or site not in self._waiting:
                if site in self.outcome.selected and site not in self._waiting:
                    if site in self.outcome.dropped:
                        return []  # answered after its fit deadline: already dropped
                    raise ProtocolViolation(site, "second answer in the same round")
                raise ProtocolViolation(site, "fit answer from a site that was not selected")
            self._waiting.discard(site)
            if isinstance(msg, Decline):
                self.outcome.declined[site] = msg.reason
                if msg.permanent:
                    self.outcome.exhausted.append(site)
            else:
                self._accept_update(site, msg)
            return self._maybe_finish_fit()
        if isinstance(msg, EvaluateRes):
            if msg.round != self.round or self.phase is not Phase.EVALUATE:
                if msg.round < self.round:
                    return []
                raise ProtocolViolation(site, "evaluation result out of stage")
            if site not in self._evaluators:
                raise ProtocolViolation(site, "evaluation result from a site that was not asked")
            self._evaluators.discard(site)
            self._eval_results[site] = (msg.num_examples, dict(msg.metrics))
            return self._maybe_finish_evaluate()
        raise ProtocolViolation(site, f"{type(msg).__name__} is not allowed during a round")

    def site_lost(self, site: int) -> list[Outbound]:
        self._lost.add(site)
        if self.phase is Phase.FIT and site in self._waiting:
            self._waiting.discard(site)
            self.outcome.dropped.append(site)
            self._evaluators.discard(site)
            return self._maybe_finish_fit()
        if self.phase is Phase.EVALUATE and site in self._evaluators:
            self._evaluators.discard(site)
            return self._maybe_finish_evaluate()
        self._evaluators.discard(site)
        return []

    def timed_out(self) -> list[Outbound]:
        """The current phase's deadline passed: whoever has not answered is dropped from it."""
        if self.phase is Phase.FIT:
            self.outcome.dropped.extend(sorted(self._waiting))
            self._evaluators -= self._waiting
            self._waiting.clear()
            return self._maybe_finish_fit()
        if self.phase is Phase.EVALUATE:
            self._evaluators.clear()
            return self._maybe_finish_evaluate()
        return []

    # -- internals -------------------------------------------------------------------------------

    def _accept_update(self, site: int, msg: FitRes) -> None:
        update = msg.update
        if set(update) != set(self._params):
            raise ProtocolViolation(site, "update does not carry exactly the shared parameters")
        for key, ref in self._params.items():
            arr = update[key]
            if arr.shape != ref.shape or arr.dtype != np.float32:
                raise ProtocolViolation(site, f"update tensor {key!r} has shape {arr.shape} {arr.dtype}")
            if not np.isfinite(arr).all():
                raise ProtocolViolation(site, f"update tensor {key!r} is not finite")
        self._sum.add(update, msg.num_samples)
        self.outcome.participants.append(site)
        self.outcome.site_metrics[site] = dict(msg.metrics)

    def _maybe_finish_fit(self) -> list[Outbound]:
        if self._waiting:
            return []
        self.outcome.participants.sort()
        self.outcome.dropped.sort()
        if self._sum.count < self.min_clients:
            self.phase = Phase.ABORTED
            self.outcome.abort_reason = (
                f"{self._sum.count} updates arrived, fewer than min_clients={self.min_clients}; nothing aggregated"
            )
            survivors = sorted(set(self.outcome.selected) - self._lost)
            return [Outbound(s, RoundAborted(self.round, self.attempt, self.outcome.abort_reason)) for s in survivors]
        new_params = self._strategy.aggregate_fit(
            self.round, self._sum, self.outcome.participants, self.outcome.dropped
        )
        if new_params is not None:
            self._params = new_params
        self.outcome.params = self._params
        self.phase = Phase.EVALUATE
        self._evaluators -= self._lost
        if not self._evaluators:
            return self._maybe_finish_evaluate()
        return [Outbound(s, EvaluateIns(self.round, self._params, "val")) for s in sorted(self._evaluators)]

    def _maybe_finish_evaluate(self) -> list[Outbound]:
        if self._evaluators:
            return []
        self.outcome.evaluation = self._strategy.aggregate_evaluate(self.round, self._eval_results)
        self.phase = Phase.DONE
        return []
