"""Pure aggregation arithmetic, O(d) memory however many sites report, and the server step.

Below both runtimes: the coordinator's strategies (``strategy/base.py``) and every site's
trajectory (``site/trajectory.py``) compute the next global model with :func:`server_step`, so
a site derives the coordinator's model bit for bit (protocol/SPEC.md §6.9)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .params import CONTROL, Params, is_statistic

__all__ = ["ADAPTIVE", "RunningSum", "ServerSettings", "apply_weighted_delta", "is_statistic", "server_step"]


class RunningSum:
    """Accumulates sum(n_k * delta_k) and sum(n_k) as updates arrive (float64 accumulators)."""

    def __init__(self, template: Params) -> None:
        self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in template.items()}
        self.total_samples = 0
        self.count = 0

    @classmethod
    def from_totals(cls, weighted_sum: Params, total_samples: int, count: int) -> RunningSum:
        """What secure aggregation yields: only the sum and the total count, never the parts."""
        out = cls({})
        out._sum = {k: np.asarray(v, dtype=np.float64) for k, v in weighted_sum.items()}
        out.total_samples, out.count = total_samples, count
        return out

    def add(self, update: Params, num_samples: int) -> None:
        for k, acc in self._sum.items():
            acc += update[k]
        self.total_samples += num_samples
        self.count += 1

    def mean_delta(self) -> Params:
        if self.total_samples <= 0:
            raise ValueError("no samples aggregated")
        return {k: (v / self.total_samples).astype(np.float32) for k, v in self._sum.items()}


def apply_weighted_delta(
    global_params: Params,
    mean_delta: Params,
    *,
    server_lr: float = 1.0,
    momentum: float = 0.0,
    velocity: Params | None = None,
) -> tuple[Params, Params | None]:
    """FedAvg (server_lr 1, no momentum) or FedAvgM (Hsu et al. 2019): w += lr * v, v = m v + delta.

    Running statistics (BatchNorm means and variances) always take the plain sample-weighted
    mean: a server step or momentum on them is meaningless and can drive a variance negative.
    """
    new_velocity: Params | None = None
    step = dict(mean_delta)
    if momentum > 0:
        new_velocity = {
            k: (momentum * velocity[k] + d if velocity is not None else d).astype(np.float32)
            for k, d in mean_delta.items()
            if not is_statistic(k)
        }
        step.update(new_velocity)
    out = {}
    for k, v in global_params.items():
        if k not in step:
            out[k] = v
        else:
            out[k] = (v + (1.0 if is_statistic(k) else server_lr) * step[k]).astype(np.float32)
    return out, new_velocity


class ServerSettings(Protocol):
    """The strategy settings the server step reads (``StrategyConfig`` on the coordinator, the
    spec's ``SpecStrategy`` at a site)."""

    name: str
    server_lr: float
    server_momentum: float
    beta1: float
    beta2: float
    tau: float
    scaffold: bool


# Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2): the adaptive server optimisers
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
_FIRST, _SECOND = "m/", "v/"  # their two moments, kept in the server optimiser's state under these prefixes


def server_step(params: Params, state: Params | None, summed: RunningSum,
                strategy: ServerSettings) -> tuple[Params, Params | None]:
    """The next global model and server optimiser state: a pure function of the model, the state,
    the sum and the strategy's settings.  Element-wise NumPy only (no reductions, BLAS or fused
    operations), so every party that computes it from the same inputs gets the same bits: the
    coordinator, and each site from a verified sum (SPEC §6.9).

    ``fedavg``, ``fedprox``, ``fedavgm``: ``w += lr Δ̄``, with server momentum ``v = m v + Δ̄,
    w += lr v`` when ``server_momentum`` > 0 (FedAvgM; ``lr`` 1 and no momentum unless set).  ``fedadam``,
    ``fedyogi``, ``fedadagrad``: ``m = β1 m + (1-β1) Δ̄``; ``v`` by Adam (``β2 v + (1-β2) Δ̄²``),
    Yogi (``v - (1-β2) Δ̄² sign(v - Δ̄²)``) or Adagrad (``v + Δ̄²``), from ``v = τ²``; then
    ``w += lr m / (√v + τ)``.  Running statistics always take the plain mean.

    ``scaffold`` (Karimireddy et al. 2020, SCAFFOLD): the sum also holds the sites' control-variate
    deltas (``c/`` tensors, weighted as their updates are), and the server's control variate, kept
    in the state under the same names from zero, moves by their mean: ``c += Δc̄``.  The model's
    step is the server optimiser's, on the update alone."""
    mean = summed.mean_delta()
    delta = {k: v for k, v in mean.items() if not k.startswith(CONTROL)}
    own = None if state is None else ({k: v for k, v in state.items() if not k.startswith(CONTROL)} or None)
    if strategy.name in ADAPTIVE:
        out, new_state = _adaptive_step(params, own, delta, strategy)
    else:
        out, new_state = apply_weighted_delta(params, delta, server_lr=strategy.server_lr,
                                              momentum=strategy.server_momentum, velocity=own)
    if not strategy.scaffold:
        return out, new_state
    before = state or {}
    controls = {k: (before[k] + d if k in before else d).astype(np.float32)
                for k, d in mean.items() if k.startswith(CONTROL)}
    return out, {**(new_state or {}), **controls}


def _adaptive_step(params: Params, state: Params | None, delta: Params,
                   s: ServerSettings) -> tuple[Params, Params]:
    f32 = np.float32
    beta1, beta2, tau, lr = f32(s.beta1), f32(s.beta2), f32(s.tau), f32(s.server_lr)
    out: Params = {}
    new_state: Params = {}
    for k, w in params.items():
        if k not in delta:
            out[k] = w
            continue
        d = delta[k].astype(f32)
        if is_statistic(k):
            out[k] = (w + d).astype(f32)
            continue
        m = state[_FIRST + k] if state is not None else np.zeros_like(d)
        v = state[_SECOND + k] if state is not None else np.full_like(d, tau * tau)
        m = beta1 * m + (f32(1) - beta1) * d
        d2 = d * d
        if s.name == "fedadam":
            v = beta2 * v + (f32(1) - beta2) * d2
        elif s.name == "fedyogi":
            v = v - (f32(1) - beta2) * d2 * np.sign(v - d2)
        else:  # fedadagrad
            v = v + d2
        new_state[_FIRST + k], new_state[_SECOND + k] = m.astype(f32), v.astype(f32)
        out[k] = (w + lr * m / (np.sqrt(v) + tau)).astype(f32)
    return out, new_state
