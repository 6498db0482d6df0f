"""One training round as a sans-IO state machine: messages and timeouts in, messages out.

No sockets, no clocks.  The anyio runtime feeds it ``receive(site, msg)``, ``site_lost(site)`` and
``timed_out()`` and sends whatever it returns.  Invariant: an update is applied only when at least
``min_clients`` sites contributed to the sum; otherwise the round is ``ABORTED`` and nothing is
aggregated (``RoundAborted`` goes to the survivors).

Phases FIT -> EVALUATE -> DONE, or FIT -> ABORTED with fewer than ``min_clients`` updates.  The
transitions are ``PLAIN_ROUND`` and ``SECURE_ROUND`` in ``_states.py`` (drawn in protocol/SPEC.md
§5); a message the round's table does not take in the current phase is a violation.

With secure aggregation (``secagg`` given), FIT runs the coordinator's secure-aggregation
machine instead of collecting plaintext updates: its key set-up starts together with ``FitIns``,
so it runs while the sites train, and FIT ends when that machine is DONE (the unmasked sum is
aggregated) or ABORTED.  A plaintext ``FitRes`` is then a protocol violation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..aggregate import RunningSum
from ..causes import AbortCause, Rule
from ..errors import ProtocolViolation
from ..params import Params, summed_layout, unflatten, update_norm
from ..scores import accuracy_score, auc_score
from ..secagg.quantize import dequantize
from ..secagg.server import Outbound, ServerStage, ServerStateMachine
from ..strategy.base import Strategy
from ..wire.messages import (
    Decline,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Message,
    RoundAborted,
    SumRecord,
)
from ._states import PLAIN_ROUND, SECAGG_MESSAGES, SECURE_ROUND, EvaluationClosed, FitClosed, FitFailed, Phase

__all__ = ["Outbound", "Phase", "ProtocolViolation", "RoundMachine", "RoundOutcome", "SiteLost"]




@dataclass(frozen=True, slots=True)
class SiteLost:
    """A site vanished: its connection closed or failed, it went silent, or it declined."""

    reason: str = ""


@dataclass
class RoundOutcome:
    round: int
    attempt: int
    selected: list[int]
    participants: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    declined: dict[int, Rule] = field(default_factory=dict)  # the rule each site named
    withdrawn: list[int] = field(default_factory=list)  # declined for good (permanent), by budget or by policy
    params: Params | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    site_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    abort_cause: AbortCause | None = None
    abort_reason: str | None = None  # the detail, for people
    secagg_stages: dict[str, list[int]] | None = None  # who completed each secure-aggregation stage
    site_eval: dict[int, dict[str, float]] = field(default_factory=dict)  # each site's evaluation metrics
    sum_digest: bytes | None = None  # the verified sum's (SPEC §6.8), under secure aggregation
    sum_record: SumRecord | None = None  # ... and its proof, for the sites that were not survivors (§6.9)
    sum_sent: list[int] = field(default_factory=list)  # the evaluators sent it before the new model


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
        secagg: ServerStateMachine | None = None,
        max_update_norm: float | None = None,
        controls: bool = False,
    ) -> None:
        if len(selected) < min_clients:
            raise ValueError(f"selected {len(selected)} sites, fewer than min_clients={min_clients}")
        self.round = rnd
        self.attempt = attempt
        self.min_clients = min_clients
        self.phase = Phase.FIT
        self._params = global_params
        # what a secure round sums: the model's tensors, and SCAFFOLD's control variates (SPEC §6.3)
        self._layout = summed_layout(global_params, controls=controls)
        self._fit_config = fit_config
        self._strategy = strategy
        self._waiting: set[int] = set(selected)
        self._evaluators = set(evaluators)
        self._lost: set[int] = set()
        self._sum = RunningSum(global_params)
        self._eval_results: dict[int, tuple[int, dict[str, float]]] = {}
        self.outcome = RoundOutcome(round=rnd, attempt=attempt, selected=sorted(selected))
        self.secagg = secagg
        self.max_update_norm = max_update_norm
        self._table = PLAIN_ROUND if secagg is None else SECURE_ROUND

    @property
    def deadline_kind(self) -> str:
        """Which timeout governs now: ``fit`` (training), ``secagg`` (a key/unmask stage), ``evaluate``."""
        if self.phase is Phase.EVALUATE:
            return "evaluate"
        if self.secagg is not None and self.secagg.stage is not ServerStage.MASKED_INPUT:
            return "secagg"
        return "fit"

    @property
    def stage_key(self) -> tuple[str, str]:
        """Changes whenever a new deadline should start."""
        sub = self.secagg.stage.value if self.secagg is not None and self.phase is Phase.FIT else ""
        return self.phase.value, sub

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.ABORTED)

    def start(self) -> list[Outbound]:
        out = [
            Outbound(s, FitIns(self.round, self.attempt, self._params, dict(self._fit_config)))
            for s in sorted(self._waiting)
        ]
        if self.secagg is not None:
            out += self.secagg.start()
        return out

    def _secagg_step(self, site: int, event: Message | SiteLost | None) -> list[Outbound]:
        """Feed the secure-aggregation machine (a message, a loss, or a timeout); finish FIT when it does."""
        sa = self.secagg
        assert sa is not None
        if event is None:
            out = list(sa.stage_timed_out())
        elif isinstance(event, SiteLost):
            out = list(sa.site_lost(site))
        else:
            out = list(sa.receive(site, event))
        if sa.stage is ServerStage.DONE:
            return out + self._finish_secure_fit()
        if sa.stage is ServerStage.ABORTED:
            assert sa.abort_cause is not None
            return out + self._abort(sa.abort_cause, sa.abort_reason or "secure aggregation aborted")
        return out

    def _finish_secure_fit(self) -> list[Outbound]:
        sa = self.secagg
        assert sa is not None and sa.result is not None
        weighted, total = dequantize(sa.result.total, sa.plan)
        survivors = sa.result.survivors
        self.outcome.secagg_stages = dict(sa.stage_sites)
        self.outcome.sum_digest = sa.result.sum_digest
        p = sa.params
        self.outcome.sum_record = SumRecord(self.round, self.attempt, list(p.participants), dict(p.fit_config),
                                            list(survivors), {"s": sa.result.total}, sa.result.vouches)
        self._sum = RunningSum.from_totals(unflatten(weighted, self._layout), total, len(survivors))
        self.outcome.participants = list(survivors)
        self.outcome.dropped = sorted(set(self.outcome.selected) - set(survivors) - set(self.outcome.declined))
        self._waiting.clear()
        return self._maybe_finish_fit()

    # -- events ----------------------------------------------------------------------------------

    def receive(self, site: int, msg: Message) -> list[Outbound]:
        kind = type(msg)
        if kind is Decline and msg.attempt == 0:  # type: ignore[attr-defined]
            return self._evaluation_declined(site, msg)  # type: ignore[arg-type]
        accepted = (self.phase, kind) in self._table
        if self.secagg is not None and kind in SECAGG_MESSAGES:
            if accepted:
                return self._secagg_step(site, msg)
            if (msg.round, msg.attempt) <= (self.round, self.attempt):  # type: ignore[attr-defined]
                return []  # a straggler's late secure-aggregation message
            raise ProtocolViolation(site, f"{kind.__name__} out of stage")
        if kind is FitRes or kind is Decline:
            return self._fit_answer(site, msg, accepted)  # type: ignore[arg-type]
        if kind is EvaluateRes:
            return self._evaluation(site, msg, accepted)  # type: ignore[arg-type]
        raise ProtocolViolation(site, f"{kind.__name__} is not allowed during a round")

    def _fit_answer(self, site: int, msg: FitRes | Decline, accepted: bool) -> list[Outbound]:
        current = (msg.round, msg.attempt) == (self.round, self.attempt)
        if self.secagg is not None and self.phase is Phase.FIT:
            if isinstance(msg, FitRes):
                raise ProtocolViolation(site, "plaintext update while secure aggregation is on")
            if current:
                if site not in self._waiting:
                    raise ProtocolViolation(site, "second answer in the same round")
                self._declined(site, msg)
                self._waiting.discard(site)
                return self._secagg_step(site, SiteLost())
        if not current:
            if (msg.round, msg.attempt) < (self.round, self.attempt):
                return []  # a late answer to an earlier round or attempt: harmless, ignored
            raise ProtocolViolation(site, f"answer for round {msg.round}.{msg.attempt} that was never asked")
        if not accepted or site not in self._waiting:
            if site in self.outcome.selected and site not in self._waiting:
                if site in self.outcome.dropped:
                    return []  # answered after its fit deadline: already dropped
                raise ProtocolViolation(site, "second answer in the same round")
            raise ProtocolViolation(site, "fit answer from a site that was not selected")
        self._waiting.discard(site)
        if isinstance(msg, Decline):
            self._declined(site, msg)
        else:
            self._accept_update(site, msg)
        return self._maybe_finish_fit()

    def _evaluation(self, site: int, msg: EvaluateRes, accepted: bool) -> list[Outbound]:
        if msg.round != self.round or not accepted:
            if msg.round < self.round:
                return []
            raise ProtocolViolation(site, "evaluation result out of stage")
        if site not in self._evaluators:
            raise ProtocolViolation(site, "evaluation result from a site that was not asked")
        self._evaluators.discard(site)
        self._eval_results[site] = (msg.num_examples, dict(msg.metrics))
        self.outcome.site_eval[site] = dict(msg.metrics)
        return self._maybe_finish_evaluate()

    def _evaluation_declined(self, site: int, msg: Decline) -> list[Outbound]:
        """A site will not evaluate the model it was sent (SPEC §6.9: not the one it derived)."""
        if msg.round < self.round:
            return []
        if msg.round != self.round or self.phase is not Phase.EVALUATE or site not in self._evaluators:
            raise ProtocolViolation(site, "an evaluation declined that was not asked")
        self._evaluators.discard(site)
        return self._maybe_finish_evaluate()

    def site_lost(self, site: int) -> list[Outbound]:
        self._lost.add(site)
        if self.secagg is not None and self.phase is Phase.FIT:
            self._waiting.discard(site)
            self._evaluators.discard(site)
            return self._secagg_step(site, SiteLost())
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
        if self.secagg is not None and self.phase is Phase.FIT:
            return self._secagg_step(-1, None)
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

    def _declined(self, site: int, msg: Decline) -> None:
        self.outcome.declined[site] = msg.rule
        if msg.permanent:  # out of the run for good (budget spent, or the run breaks its policy)
            self.outcome.withdrawn.append(site)
            self._evaluators.discard(site)

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
        if self.max_update_norm is not None:
            # the update is num_samples * delta; honest sites scaled delta to the bound (float32
            # rounding aside), so anything longer was not sent by one
            norm = update_norm(update) / msg.num_samples
            if norm > self.max_update_norm * (1 + 1e-4):
                raise ProtocolViolation(site, f"update norm {norm:.4g} per sample exceeds "
                                              f"train.max_update_norm={self.max_update_norm:g}")
        self._sum.add(update, msg.num_samples)
        self.outcome.participants.append(site)
        self.outcome.site_metrics[site] = dict(msg.metrics)

    def _enter(self, event: type) -> None:
        self.phase = self._table[(self.phase, event)]  # a KeyError here is a bug: see _states.py

    def _abort(self, cause: AbortCause, detail: str) -> list[Outbound]:
        self._enter(FitFailed)
        self.outcome.abort_cause, self.outcome.abort_reason = cause, detail
        survivors = sorted(set(self.outcome.selected) - self._lost)
        return [Outbound(s, RoundAborted(self.round, self.attempt, cause, detail)) for s in survivors]

    def _maybe_finish_fit(self) -> list[Outbound]:
        if self._waiting:
            return []
        self.outcome.participants.sort()
        self.outcome.dropped.sort()
        if self._sum.count < self.min_clients:
            return self._abort(
                AbortCause.TOO_FEW_SITES,
                f"{self._sum.count} updates arrived, fewer than min_clients={self.min_clients}; nothing aggregated"
            )
        new_params = self._strategy.aggregate_fit(
            self.round, self._sum, self.outcome.participants, self.outcome.dropped
        )
        if new_params is not None:
            self._params = new_params
        self.outcome.params = self._params
        self._enter(FitClosed)
        self._evaluators -= self._lost
        if not self._evaluators:
            return self._maybe_finish_evaluate()
        # An evaluator that was not a survivor steps to the new model from the sum's record first.
        rec = self.outcome.sum_record
        if rec is not None:
            self.outcome.sum_sent = sorted(self._evaluators - set(self.outcome.participants))
        records = [Outbound(s, rec) for s in self.outcome.sum_sent] if rec is not None else []
        return records + [Outbound(s, EvaluateIns(self.round, self._params, "val")) for s in sorted(self._evaluators)]

    def _maybe_finish_evaluate(self) -> list[Outbound]:
        if self._evaluators:
            return []
        self.outcome.evaluation = self._strategy.aggregate_evaluate(self.round, self._eval_results)
        self._enter(EvaluationClosed)
        return []


class TestEvaluation:
    """The final model scored on the official test split: each site on its share, with its own
    local layers (sans-IO, like the round).  A site whose policy shares predictions sends one score
    per example; the others send their own AUC and accuracy.  When every site shared, the scores are
    pooled into one AUC and accuracy; the sites' mean AUC is reported either way."""

    def __init__(self, *, rnd: int, sites: list[int], params: Params) -> None:
        self.round = rnd
        self._waiting = set(sites)
        self._params = params
        self.results: dict[int, EvaluateRes] = {}

    @property
    def finished(self) -> bool:
        return not self._waiting

    def start(self) -> list[Outbound]:
        return [Outbound(s, EvaluateIns(self.round, self._params, "test")) for s in sorted(self._waiting)]

    def receive(self, site: int, msg: Message) -> list[Outbound]:
        if isinstance(msg, EvaluateRes) and msg.split == "test" and msg.round == self.round and site in self._waiting:
            if msg.predictions:
                self._check_predictions(site, msg.predictions)
            self._waiting.discard(site)
            self.results[site] = msg
            return []
        if isinstance(msg, Decline) and msg.attempt == 0 and msg.round == self.round and site in self._waiting:
            self._waiting.discard(site)  # it will not score a model it did not derive (SPEC §6.9)
            return []
        if isinstance(msg, (FitRes, EvaluateRes, Decline, *SECAGG_MESSAGES)):
            return []  # stragglers from the last round
        raise ProtocolViolation(site, f"{type(msg).__name__} during the final test evaluation")

    def site_lost(self, site: int) -> list[Outbound]:
        self._waiting.discard(site)
        return []

    def timed_out(self) -> list[Outbound]:
        self._waiting.clear()
        return []

    def _check_predictions(self, site: int, predictions: Params) -> None:
        """Scores a pooled AUC can use: float32 probabilities, labels that name a column, and the
        same layout as every other site's (a hostile site's NaN or label 7 broke the pooling)."""
        scores, labels = predictions["scores"], predictions["labels"]
        ok = (scores.dtype == np.float32 and bool(np.isfinite(scores).all()) and float(scores.min(initial=0)) >= 0
              and float(scores.max(initial=0)) <= 1 and labels.dtype.kind in "iubf")
        if ok and labels.ndim == 1:
            ok = bool(np.isin(labels, np.arange(scores.shape[1])).all())
        elif ok:
            ok = labels.shape == scores.shape and bool(np.isin(labels, (0, 1)).all())
        other = next((r.predictions for r in self.results.values() if r.predictions), None)
        if ok and other is not None:
            ok = other["scores"].shape[1] == scores.shape[1] and other["labels"].ndim == labels.ndim
        if not ok:
            raise ProtocolViolation(site, "test predictions that are not probabilities with labels in range, "
                                          "laid out as the other sites'")

    def pooled(self) -> dict[str, Any]:
        if not self.results:
            return {}
        shared = {site: r for site, r in self.results.items() if r.predictions}
        per_site = {site: _auc(r.predictions["labels"], r.predictions["scores"]) for site, r in shared.items()}
        per_site.update({site: float(r.metrics["auc"]) for site, r in self.results.items()
                         if site not in shared and _metric(r.metrics.get("auc"))})
        defined = {site: a for site, a in per_site.items() if a is not None}
        out: dict[str, Any] = {
            "test_sites": sorted(self.results),
            # each site's own AUC on its share (FedBN models score on site-specific scales)
            "test_site_auc": {str(k): v for k, v in sorted(defined.items())},
        }
        if defined:
            out["test_auc_site_mean"] = float(np.mean(list(defined.values())))
        if len(shared) == len(self.results):  # every site sent its scores: pool them
            scores = np.concatenate([r.predictions["scores"] for r in shared.values()])
            labels = np.concatenate([r.predictions["labels"] for r in shared.values()])
            out.update(test_accuracy=accuracy_score(labels, scores), test_examples=int(len(labels)))
            if (auc := _auc(labels, scores)) is not None:
                out["test_auc"] = auc
        return out


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The AUC, or None where it is undefined (one class only) or the inputs cannot give one."""
    try:
        return auc_score(labels, scores)
    except ValueError:
        return None


def _metric(value: Any) -> bool:
    """A site's reported AUC, if it is one (a hostile site's 7.0 is left out; the wire refuses NaN)."""
    return isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0
