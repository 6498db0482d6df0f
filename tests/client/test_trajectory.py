"""A site computes the coordinator's next global model itself, bit for bit, from the sum it
verified (issue 27, part 1's first step: ``site/trajectory.py``).  Three secure rounds in process,
FedAvg, FedProx, FedAvgM and the adaptive FedAdam, FedYogi and FedAdagrad (whose momentum and
moments the site keeps as the coordinator does)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from asagiri.aggregate import RunningSum
from asagiri.config import FederationConfig, PolicyConfig, RunSpec, SecAggConfig
from asagiri.params import flatten, summed_layout, unflatten
from asagiri.policy import SitePolicy
from asagiri.secagg.binding import params_digest
from asagiri.secagg.inmemory import LocalRound
from asagiri.secagg.quantize import dequantize
from asagiri.site.trajectory import next_model
from asagiri.strategy.base import FedAvg


@pytest.mark.parametrize("strategy", [
    {"name": "fedavg"},
    {"name": "fedprox", "mu": 0.01},
    {"name": "fedavgm", "server_lr": 0.7, "server_momentum": 0.9},
    {"name": "fedadam"},
    {"name": "fedyogi", "server_lr": 0.03, "tau": 1e-2},
    {"name": "fedadagrad", "beta1": 0.0},
    {"name": "fedavg", "scaffold": True},
    {"name": "fedadam", "scaffold": True},
])
def test_a_site_computes_the_coordinators_next_model_bit_for_bit(strategy):
    cfg = FederationConfig.model_validate({"strategy": strategy})
    spec = RunSpec.of(cfg)
    rng = np.random.default_rng(0)
    w0 = {"conv.weight": rng.normal(0, 0.1, (3, 4)).astype(np.float32), "bias": rng.normal(0, 0.1, 5).astype(np.float32),
          "bn.running_mean": rng.normal(0, 0.1, 2).astype(np.float32)}
    coordinator = FedAvg(cfg, w0)
    site_params, site_velocity = dict(w0), None
    layout = summed_layout(w0, controls=spec.strategy.scaffold)  # SCAFFOLD: control deltas too, none for statistics
    d = sum(a.size for a in layout.values())
    assert d == 19 + (17 if spec.strategy.scaffold else 0)
    for rnd in (1, 2, 3):
        fed = LocalRound(ids=[1, 2, 3], dim=d, secagg=SecAggConfig(), rnd=rnd,
                         policy=partial(SitePolicy, PolicyConfig()))
        inputs = {i: (rng.normal(0, 0.05, d).astype(np.float32), int(rng.integers(1, 500))) for i in fed.ids}
        server = fed.deliver(inputs)
        assert server.result is not None, server.abort_reason
        # the coordinator, as coordinator/round.py and strategy/base.py do it
        weighted, count = dequantize(server.result.total, fed.plan)
        summed = RunningSum.from_totals(unflatten(weighted, layout), count, 3)
        new = coordinator.aggregate_fit(rnd, summed, server.result.survivors, [])
        # the site, from the sum it verified
        verified = fed.clients[1].verified
        assert verified is not None and verified.digest == server.result.sum_digest
        site_params, site_velocity = next_model(site_params, site_velocity, verified.total, fed.plan, spec.strategy, 3)
        assert params_digest(site_params) == params_digest(new)
        assert all(site_params[k].dtype == np.float32 for k in site_params)
        if strategy["name"] not in ("fedavg", "fedprox") or spec.strategy.scaffold:  # the server optimiser's state too
            assert site_velocity.keys() == coordinator.velocity.keys()
            assert all(np.array_equal(site_velocity[k], coordinator.velocity[k]) for k in site_velocity)
            controls = {k for k in site_velocity if k.startswith("c/")}
            assert controls == ({"c/conv.weight", "c/bias"} if spec.strategy.scaffold else set())
    assert not np.array_equal(flatten(site_params), flatten(w0))  # the model moved
