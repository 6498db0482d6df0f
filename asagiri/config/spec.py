"""``Welcome.spec``: the part of fed.yaml every site of a run receives and acts on (``RunSpec``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .base import _Strict
from .federation import (
    DataConfig,
    DPConfig,
    FederationConfig,
    ModelConfig,
    SecAggConfig,
    StrategyName,
    TrainConfig,
)

__all__ = ["RunSpec", "SpecStrategy"]


class SpecStrategy(_Strict):
    """The part of ``strategy`` a site acts on (``StrategyConfig``'s other keys stay with the coordinator)."""

    name: StrategyName = "fedavg"
    mu: float = Field(0.0, ge=0)
    fedbn: bool = False
    # the server optimiser: with them every site can compute the next model from a verified sum
    # (``aggregate.server_step``; issue 27, part 1)
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    scaffold: bool = False


class RunSpec(_Strict):
    """``Welcome.spec``: how every site of the run trains, built from fed.yaml by the coordinator.

    A site validates it whole before acting on any of it (a malformed spec is refused, never a
    crash) and binds its digest into every secure-aggregation round, so all sites of a round
    provably received the same one (``secagg/binding.py``).
    """

    model: ModelConfig
    train: TrainConfig
    strategy: SpecStrategy
    data: DataConfig
    rounds: int = Field(ge=1)
    heartbeat_interval: float = Field(gt=0)
    heartbeat_timeout: float = Field(gt=0)
    min_clients: int = Field(ge=1)
    secagg_stage_timeout: float = Field(gt=0)
    secagg: SecAggConfig
    dp: DPConfig

    @classmethod
    def of(cls, cfg: FederationConfig) -> RunSpec:
        t = cfg.timeouts
        return cls(
            model=cfg.model, train=cfg.train,
            strategy=SpecStrategy.model_validate(cfg.strategy.model_dump(exclude={"custom"})),
            data=cfg.data.model_copy(update={"path": None}), rounds=cfg.rounds,
            heartbeat_interval=t.heartbeat_interval, heartbeat_timeout=t.heartbeat_timeout,
            min_clients=cfg.min_clients, secagg_stage_timeout=t.secagg_stage,
            secagg=cfg.secagg.model_copy(update={"batches": cfg.participation_batches()}), dp=cfg.dp,
        )

    def wire(self) -> dict[str, Any]:
        """The spec as Welcome carries it (``data.path`` never leaves the coordinator)."""
        out = self.model_dump()
        del out["data"]["path"]
        return out
