"""Strategy hooks in the shape Flower users know, adapted to secure aggregation.

Under secure aggregation the coordinator only ever sees sum(n_k * delta_k) and sum(n_k), so
``aggregate_fit`` receives that sum, not a list of per-site results.  FedProx is FedAvg on the
server: its proximal term lives in the client's loss (``train/loop.py``), passed as ``mu`` in the
fit config (Li et al. 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..aggregate import RunningSum, server_step
from ..config import FederationConfig
from ..params import Params
from .selection import select_clients

__all__ = ["FedAvg", "FitPlan", "Strategy", "StrategyState", "build_strategy"]


@dataclass(frozen=True)
class FitPlan:
    sites: list[int]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StrategyState:
    """What the coordinator keeps of a strategy across rounds and restarts (the checkpoint): the
    global model, and the server optimiser's state (FedAvgM's momentum; None for the others)."""

    params: Params
    velocity: Params | None = None


class Strategy(Protocol):
    """The hooks the round calls, and ``state``/``load_state``, all the driver touches besides:
    the global model it sends and records, and what a checkpoint saves and ``--resume`` restores."""

    def state(self) -> StrategyState: ...

    def load_state(self, state: StrategyState) -> None: ...

    def configure_fit(self, rnd: int, attempt: int, available: list[int]) -> FitPlan: ...

    def aggregate_fit(self, rnd: int, summed: RunningSum, survivors: list[int], dropped: list[int]) -> Params | None: ...

    def configure_evaluate(self, rnd: int, available: list[int]) -> list[int]: ...

    def aggregate_evaluate(self, rnd: int, results: dict[int, tuple[int, dict[str, float]]]) -> dict[str, Any]: ...


class FedAvg:
    """FedAvg (McMahan et al. 2017) and the server optimisers of ``aggregate.server_step``, with
    the parts a run combines: ``server_momentum`` (FedAvgM), ``mu`` (FedProx), ``fedbn`` (FedBN,
    which keeps the normalisation layers out of what is sent)."""

    def __init__(self, cfg: FederationConfig, global_params: Params) -> None:
        self.cfg = cfg
        self.params = global_params
        self.velocity: Params | None = None

    def state(self) -> StrategyState:
        return StrategyState(self.params, self.velocity)

    def load_state(self, state: StrategyState) -> None:
        self.params, self.velocity = state.params, state.velocity

    def configure_fit(self, rnd: int, attempt: int, available: list[int]) -> FitPlan:
        sel = self.cfg.selection
        sites = select_clients(
            available, rnd=rnd, attempt=attempt, policy=sel.policy, min_clients=self.cfg.min_clients,
            fraction=sel.fraction, max_per_round=sel.max_per_round, seed=sel.seed,
            batches=self.cfg.participation_batches(),
        )
        # FedProx's term is a part any server optimiser combines with (strategy.mu > 0)
        return FitPlan(sites=sites, config={"mu": self.cfg.strategy.mu,
                                            "seed": sel.seed * 1_000_003 + rnd * 101 + attempt})

    def aggregate_fit(self, rnd: int, summed: RunningSum, survivors: list[int], dropped: list[int]) -> Params | None:
        if summed.total_samples <= 0:
            return None
        self.params, self.velocity = server_step(self.params, self.velocity, summed, self.cfg.strategy)
        return self.params

    def configure_evaluate(self, rnd: int, available: list[int]) -> list[int]:
        return sorted(available)

    def aggregate_evaluate(self, rnd: int, results: dict[int, tuple[int, dict[str, float]]]) -> dict[str, Any]:
        """Sample-weighted means over sites, plus each site's own values."""
        out: dict[str, Any] = {}
        for key in ("auc", "accuracy", "loss"):
            have = {s: (n, m[key]) for s, (n, m) in results.items() if n > 0 and _plausible(key, m.get(key))}
            if have:
                total = sum(n for n, _ in have.values())
                out[key] = sum(n * v for n, v in have.values()) / total
                out[f"site_{key}"] = {str(s): v for s, (_, v) in sorted(have.items())}
        # sites whose split holds one class (or, with several, lacks one): they have no AUC, and say so
        if undefined := sorted(s for s, (_, m) in results.items() if m.get("auc_undefined") == 1.0):
            out["site_auc_undefined"] = undefined
        return out


def _plausible(key: str, value: Any) -> bool:
    """A site's reported metric, if it is one (a hostile site's inf or 1e308 would otherwise
    break the weighted mean and the records, which refuse non-finite numbers)."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return 0.0 <= value <= 1.0 if key in ("auc", "accuracy") else 0.0 <= value < 1e6


def build_strategy(cfg: FederationConfig, global_params: Params) -> Strategy:
    """FedAvg (and FedProx / FedAvgM through its config), or ``strategy.custom``'s class."""
    if cfg.strategy.custom:
        import importlib

        module, _, name = cfg.strategy.custom.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"strategy.custom={cfg.strategy.custom}: {exc}") from None
        return cls(cfg, global_params)
    return FedAvg(cfg, global_params)
