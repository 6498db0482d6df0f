"""The next global model as a site computes it from a sum it verified (issue 27, part 1: not yet
what the site trains on; docs/design/verified-rounds.md).

The same two steps as the coordinator's round (``coordinator/round.py``) and strategy
(``strategy/base.py``): dequantise the ring sum into a running sum laid out as the model, then
:func:`~asagiri.strategy.aggregate.server_step`.  Both are element-wise NumPy, so a site that starts
from the same model gets the coordinator's next model bit for bit
(``tests/client/test_trajectory.py``).
"""

from __future__ import annotations

import numpy as np

from ..config.spec import SpecStrategy
from ..params import Params, unflatten
from ..secagg.plan import QuantPlan
from ..secagg.quantize import dequantize
from ..strategy.aggregate import RunningSum, server_step

__all__ = ["next_model"]


def next_model(params: Params, velocity: Params | None, total: np.ndarray, plan: QuantPlan, strategy: SpecStrategy,
               survivors: int) -> tuple[Params, Params | None]:
    """``W_{t+1}`` (and the server optimiser's state) from ``W_t`` and a verified ring sum."""
    weighted, count = dequantize(total, plan)
    summed = RunningSum.from_totals(unflatten(weighted, params), count, survivors)
    if summed.total_samples <= 0:
        return params, velocity  # as the coordinator's strategy: nothing to step with
    return server_step(params, velocity, summed, name=strategy.name, server_lr=strategy.server_lr,
                       server_momentum=strategy.server_momentum)
