"""Issue 27, part 4: differencing two sums, against real ``asagiri-client`` processes.

A scripted coordinator that holds the coordinator's key runs two rounds on the same global model
whose participants differ by one site, and subtracts the sums.  The sites train full-batch, so an
update does not depend on the seed the site draws: the difference *is* that site's update when
the attack works, and each test compares with the update computed here independently.

- Control (``test_malicious_coordinator.py``'s sites: no batches, a policy that allows that):
  the difference of {1..5} and {1..4} is site 5's update.
- Default policy, batches [[1, 2, 3], [4, 5, 6]]: every way of getting the smaller sum is refused
  with rule ``batches`` (a smaller participant list; the whole list at the start and a smaller
  survivor list at the consistency check; an abort after unmasking and a retry over fewer
  sites), and what the coordinator can get, whole batches, differs from the bigger sum by three
  sites' updates, none of which it matches.
"""

from __future__ import annotations

import numpy as np
import pytest

from asagiri.config import RunSpec
from asagiri.initial import initial_params
from asagiri.params import flatten
from asagiri.secagg.quantize import dequantize
from asagiri.wire.messages import Decline, FitIns

from .malicious import FED, UNRECORDED_OK, Attacker, Round, canonical_hash, next_round, rule_of

pytestmark = pytest.mark.e2e

ALL = [1, 2, 3, 4, 5, 6]
BATCHES = [[1, 2, 3], [4, 5, 6]]
# Full-batch SGD (every site has about 53 examples): an update is the same whatever seed the site draws.
FULL_BATCH = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "batch_size": 128, "augment": False}
# scatter_linear: fixed features, so the default policy asks for no augmentation (which would draw from the seed)


def spec_of(attacker: Attacker, *, batches) -> dict:
    spec = RunSpec.model_validate(attacker.spec)
    return spec.model_copy(update={
        "model": spec.model.model_copy(update={"name": "scatter_linear"}),
        "train": spec.train.model_copy(update=FULL_BATCH),
        # a 64-bit ring with the finest scale the default bounds allow: rounding does not hide anything
        "secagg": spec.secagg.model_copy(update={"batches": batches, "mode": "complete", "threshold": None,
                                                 "shares": None, "bits": 64, "max_samples_per_site": 1000}),
    }).wire()


def true_update(attacker: Attacker, site: int, fit: FitIns, spec: dict) -> np.ndarray:
    """``clip(delta)`` as the site computes it from ``fit`` (``count: one``: weighed by 1)."""
    delta, _ = attacker.worker(site, spec).train(fit)
    clip = RunSpec.model_validate(spec).secagg.clip
    return np.clip(flatten(delta).astype(np.float64), -clip, clip)


def relative_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - truth) / max(np.linalg.norm(truth), 1e-12))


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to quantisation and float summation order: the attack recovered it."""
    return relative_error(a, b) <= 1e-3


def honest_sum(attacker: Attacker, participants: list[int], fit: FitIns, spec: dict, run: str) -> np.ndarray:
    async def script(sessions):
        rnd = Round(attacker, sessions, participants, fit=fit, spec=spec)
        return dequantize(await rnd.honest(), rnd.params.plan)[0]

    return attacker.case(script, sites=participants, spec=spec, run=run, timeout=120)


def first_fit(attacker: Attacker) -> FitIns:
    """A round's FitIns with the scatter_linear model of ``spec_of``."""
    cfg = FED.model_copy(update={"model": FED.model.model_copy(update={"name": "scatter_linear"}),
                                 "train": FED.train.model_copy(update=FULL_BATCH)})
    return attacker.fit_ins(next_round(), params=initial_params(cfg))


def same_model(attacker: Attacker, fit: FitIns) -> FitIns:
    """A new round number (the sites refuse a replayed one) with the same global model."""
    return attacker.fit_ins(next_round(), params=fit.params, config=fit.config)


# -- control: no batches, and a policy that allows that ------------------------------------------------


@pytest.fixture(scope="module")
def unbatched(tmp_path_factory):
    with Attacker.running(tmp_path_factory.mktemp("unbatched"), [1, 2, 3, 4, 5], policy=UNRECORDED_OK) as a:
        yield a


def test_control_without_batches_two_sums_give_one_sites_update(unbatched):
    spec = spec_of(unbatched, batches=None)
    run = f"control-{canonical_hash(spec)}"
    fit = first_fit(unbatched)
    bigger = honest_sum(unbatched, [1, 2, 3, 4, 5], fit, spec, run)
    smaller = honest_sum(unbatched, [1, 2, 3, 4], same_model(unbatched, fit), spec, run)
    assert close(bigger - smaller, true_update(unbatched, 5, fit, spec))


# -- the default policy, with batches ------------------------------------------------------------------


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    # UNRECORDED_OK: each case is a new session that takes a sum without sending its record.
    with Attacker.running(tmp_path_factory.mktemp("batched"), ALL,
                          policy={**UNRECORDED_OK, "require_batches": True}) as a:
        yield a


def test_the_default_policy_refuses_a_run_without_batches(batched):
    spec = spec_of(batched, batches=None)

    async def script(sessions):
        fit = first_fit(batched)
        for s in ALL:
            await sessions[s].conn.send(fit)
        return {s: await sessions[s].expect() for s in ALL}

    replies = batched.case(script, sites=ALL, spec=spec, run=f"unbatched-{canonical_hash(spec)}")
    assert all(isinstance(m, Decline) and m.permanent and rule_of(m.rule) == "batches" for m in replies.values())


def test_with_batches_no_two_sums_differ_by_one_site(batched):
    spec = spec_of(batched, batches=BATCHES)
    run = f"batched-{canonical_hash(spec)}"
    fit = first_fit(batched)
    bigger = honest_sum(batched, ALL, fit, spec, run)  # the honest round: whole batches, no refusal

    # 1. the same model over one site fewer: refused by every site at the start
    async def fewer(sessions):
        rnd = Round(batched, sessions, [1, 2, 3, 4, 5], fit=same_model(batched, fit), spec=spec)
        await rnd.start()
        return rnd.declines

    declines = batched.case(fewer, sites=ALL, spec=spec, run=run)
    assert set(declines) == {1, 2, 3, 4, 5} and {rule_of(r) for r in declines.values()} == {"batches"}

    # 2. everyone at the start, then a survivor list without site 6: refused by every site; the
    #    coordinator holds masked inputs and nothing to unmask them with
    async def cut_survivors(sessions):
        rnd = Round(batched, sessions, ALL, fit=same_model(batched, fit), spec=spec)
        await rnd.start()
        await rnd.roster()
        await rnd.deliver()
        await rnd.consistency({s: [1, 2, 3, 4, 5] for s in [1, 2, 3, 4, 5]})
        return rnd

    rnd = batched.case(cut_survivors, sites=ALL, spec=spec, run=run)
    assert set(rnd.declines) == {1, 2, 3, 4, 5} and {rule_of(r) for r in rnd.declines.values()} == {"batches"}
    assert rnd.sigs == {} and rnd.responses == []

    # 3. what the batches allow: the same model over batch [1, 2, 3] (an abort and retry does no
    #    more). The difference is batch [4, 5, 6]'s sum: three sites, none of them alone.
    smaller = honest_sum(batched, [1, 2, 3], same_model(batched, fit), spec, run)
    difference = bigger - smaller
    trues = {s: true_update(batched, s, fit, spec) for s in (4, 5, 6)}
    assert close(difference, sum(trues.values()))  # the honest sums are what the sites sent
    assert min(relative_error(difference, t) for t in trues.values()) > 0.5  # far from any one site's
