"""Issue 27, part 1: sites train and evaluate only models they derived (SPEC §6.9), against real
``asagiri-client`` processes and a scripted coordinator that holds the coordinator's key.

- A crafted model (``W_0`` nudged by 1e-6 per weight, which no "same model" check would catch, and
  a trap that zeroes the head) is declined by every site under the default policy, and nothing
  of the round leaves them.  The control, three sites whose policy allows foreign models, trains on
  it: the sum the coordinator unmasks is the sum of their true updates from the crafted model,
  computed here independently.
- Evaluation of foreign parameters is declined; the derived model is evaluated once per split.
  The control, a site whose policy allows foreign models, evaluates the trap every time asked.
- A site that was not in a round catches up from the round's ``SumRecord`` (a tampered one is
  ignored, and the model it would give is declined), the survivors commit their pending step when
  the next ``FitIns`` names it, none goes back to ``W_0`` afterwards, and a restarted site says
  (``ModelAt``) it holds the new model, from its disk.
"""

from __future__ import annotations

import numpy as np
import pytest

from asagiri.causes import Rule
from asagiri.config import RunSpec
from asagiri.initial import initial_params
from asagiri.secagg.binding import params_digest
from asagiri.site.trajectory import next_model
from asagiri.wire.messages import (
    AdvertiseKeys,
    Decline,
    EvaluateIns,
    EvaluateRes,
    ModelAt,
    SumRecord,
)

from .malicious import FED, UNRECORDED_OK, Attacker, Round, next_round

pytestmark = pytest.mark.e2e

DERIVING = [1, 2, 3, 4]


def w0(run: str) -> dict[str, np.ndarray]:
    """``W_0`` of ``run``, as anyone computes it from the run's id and spec."""
    return initial_params(FED.model_copy(update={"run_id": run}))


W0 = w0("derived-crafted")


@pytest.fixture(scope="module")
def deriving(tmp_path_factory):
    with Attacker.running(tmp_path_factory.mktemp("derived"), DERIVING,
                          policy={**UNRECORDED_OK, "derive_models": True}) as a:
        yield a


@pytest.fixture(scope="module")
def permissive(tmp_path_factory):
    with Attacker.running(tmp_path_factory.mktemp("foreign"), [1, 2, 3], policy=UNRECORDED_OK) as a:
        yield a


async def model_at(sessions, sites) -> dict[int, ModelAt]:
    """Each deriving site says where it stands once set up, every session."""
    got = {}
    for site in sites:
        msg = await sessions[site].expect(timeout=60)
        assert isinstance(msg, ModelAt), (site, msg)
        got[site] = msg
    return got


def crafted_models() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    nudged = {k: (v + rng.normal(0, 1e-6, v.shape)).astype(np.float32) for k, v in W0.items()}
    trap = {k: (np.zeros_like(v) if k.startswith("head") else v) for k, v in W0.items()}
    return {"nudged": nudged, "trap": trap}


def test_every_site_derives_w0_itself_and_says_so(deriving):
    async def script(sessions):
        return await model_at(sessions, DERIVING)

    at = deriving.case(script, sites=DERIVING, run="derived-w0")
    assert {s: (m.round, m.digest) for s, m in at.items()} == {s: (0, params_digest(w0("derived-w0"))) for s in DERIVING}


def test_a_crafted_model_is_declined_and_nothing_of_its_round_leaves_the_sites(deriving):
    async def script(sessions):
        await model_at(sessions, DERIVING)
        outcomes = {}
        for name, model in crafted_models().items():
            rnd = Round(deriving, sessions, DERIVING, fit=deriving.fit_ins(next_round(), params=model))
            await rnd.start()
            outcomes[name] = (rnd.declines, rnd.keys)
        return outcomes

    for name, (declines, keys) in deriving.case(script, sites=DERIVING, run="derived-crafted").items():
        assert keys == {}, name  # not even a key advertisement
        assert declines == {s: Rule.DERIVE_MODELS for s in DERIVING}, name
    assert "not the one this site derived" in deriving.log(1)


def test_control_sites_that_allow_foreign_models_train_on_the_crafted_one(permissive):
    model = crafted_models()["nudged"]
    fit = permissive.fit_ins(next_round(), params=model)

    async def script(sessions):
        rnd = Round(permissive, sessions, [1, 2, 3], fit=fit)
        return rnd.params, await rnd.honest()

    p, total = permissive.case(script, sites=[1, 2, 3], run="foreign-crafted")
    unmasked = total.view(p.plan.signed)[:-1].astype(np.float64) / p.plan.scale
    true = sum(permissive.true_update(s, fit)[0] for s in (1, 2, 3))
    # what the coordinator unmasked is the sum of what the sites trained from its crafted model
    assert np.max(np.abs(unmasked - true)) <= 3 / p.plan.scale + 1e-6 * float(np.max(np.abs(true)))
    assert np.max(np.abs(true)) > 100 / p.plan.scale  # and they did train: the check can fail


def test_foreign_parameters_are_not_evaluated_and_the_derived_model_only_once(deriving):
    async def script(sessions):
        await model_at(sessions, DERIVING)
        rnd = next_round()
        answers = {}
        own = w0("derived-evaluate")
        for what, model, split in (("crafted", crafted_models()["trap"], "val"), ("derived", own, "test"),
                                   ("again", own, "test")):
            await sessions[1].conn.send(EvaluateIns(rnd, model, split))
            answers[what] = await sessions[1].expect(timeout=60)
        return answers

    answers = deriving.case(script, sites=DERIVING, run="derived-evaluate")
    assert answers["crafted"] == Decline(answers["crafted"].round, 0, Rule.DERIVE_MODELS, False)
    assert isinstance(answers["derived"], EvaluateRes) and answers["derived"].split == "test"
    assert isinstance(answers["again"], Decline) and answers["again"].rule is Rule.DERIVE_MODELS


def test_control_a_site_that_allows_foreign_models_evaluates_them_every_time(permissive):
    async def script(sessions):
        rnd, answers = next_round(), []
        for _ in range(2):
            await sessions[1].conn.send(EvaluateIns(rnd, crafted_models()["trap"], "val"))
            answers.append(await sessions[1].expect(timeout=60))
        return answers

    answers = permissive.case(script, sites=[1, 2, 3], run="foreign-evaluate")
    assert all(isinstance(a, EvaluateRes) and a.split == "val" for a in answers), answers


def test_a_site_outside_a_round_catches_up_from_its_record_and_no_site_goes_back(deriving):
    run = "derived-catchup"
    spec = RunSpec.model_validate(deriving.spec)
    W0 = w0(run)  # noqa: N806 - the paper's name

    async def first_round(sessions):
        await model_at(sessions, DERIVING)
        first = Round(deriving, sessions, [1, 2, 3], fit=deriving.fit_ins(next_round(), params=W0))
        await first.honest()
        return first

    # a session of its own: the round's signed record, which sites 1-3 would want before the next
    # round in the same session, is not the subject (the harness's sites excuse it once a session)
    first = deriving.case(first_round, sites=DERIVING, run=run)
    r = first.result
    assert r is not None
    w1, _ = next_model(W0, None, r.total, first.params.plan, spec.strategy, len(r.survivors))
    record = SumRecord(first.fit.round, 1, list(first.params.participants), dict(first.fit.config),
                       list(r.survivors), {"s": r.total}, r.vouches)
    tampered_total = r.total.copy()
    tampered_total[3] += np.array(1, dtype=r.total.dtype)
    w1_tampered, _ = next_model(W0, None, tampered_total, first.params.plan, spec.strategy, len(r.survivors))
    tampered = SumRecord(record.round, 1, record.participants, record.config, record.survivors,
                         {"s": tampered_total}, record.vouches)

    async def script(sessions):
        at = await model_at(sessions, DERIVING)
        # the tampered record proves nothing: site 4 stays at W_0 and declines the model it gives
        await sessions[4].conn.send(tampered)
        await sessions[4].conn.send(deriving.fit_ins(next_round(), params=w1_tampered))
        refused = await sessions[4].expect(timeout=60)
        # the honest record: site 4 steps to W_1 with the others
        await sessions[4].conn.send(record)
        second = Round(deriving, sessions, DERIVING, fit=deriving.fit_ins(next_round(), params=w1))
        await second.start()
        # nobody goes back to W_0 once W_1 was kept
        back = Round(deriving, sessions, DERIVING, fit=deriving.fit_ins(next_round(), params=W0))
        await back.start()
        return at, refused, second, back

    at, refused, second, back = deriving.case(script, sites=DERIVING, run=run, timeout=180)
    # the survivors hold W_1 as pending, not kept, until the coordinator commits the round
    assert {(m.round, m.digest) for m in at.values()} == {(0, params_digest(W0))}
    assert isinstance(refused, Decline) and refused.rule is Rule.DERIVE_MODELS
    assert second.declines == {} and sorted(second.keys) == DERIVING
    assert all(isinstance(k, AdvertiseKeys) for k in second.keys.values())
    assert back.keys == {} and back.declines == {s: Rule.DERIVE_MODELS for s in DERIVING}

    # a restarted site goes on from its disk: it says it holds W_1
    deriving.procs[4].kill()
    deriving.procs[4].wait()
    deriving.start_site(4)

    async def reconnect(sessions):
        return await model_at(sessions, DERIVING)

    at = deriving.case(reconnect, sites=DERIVING, run=run)
    assert {(m.round, m.digest) for m in at.values()} == {(first.fit.round, params_digest(w1))}
