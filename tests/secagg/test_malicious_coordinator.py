"""A coordinator running modified code against real site processes on loopback.

Five ``asagiri-client`` processes with the default policy and pinned peers, as ``asagiri demo``
lays them out, face the scripted attacker of ``malicious.py``.  For each attack: the targeted
site refuses (its Decline names the rule), and the attacker's best unmasking of whatever it
collected is compared with the site's true update, computed here from the same config and
FitIns.  ``test_control_an_honest_round_sums_to_the_true_updates`` shows that comparison can
succeed: the honest sum matches the true updates to within the quantisation bound.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys

import anyio
import numpy as np
import pytest

from asagiri.config import RunSpec
from asagiri.params import flatten
from asagiri.secagg.quantize import dequantize
from asagiri.wire.crypto import EphemeralKey, Identity
from asagiri.wire.errors import ConnectionLost
from asagiri.wire.messages import (
    Decline,
    EvaluateIns,
    FitIns,
    FitRes,
    UnmaskRequest,
    UnmaskResponse,
)

from .malicious import (
    RUN,
    UNRECORDED_OK,
    Attacker,
    ColludingSite,
    Round,
    canonical_hash,
    declined,
    matches,
    next_round,
    rule_of,
)

pytestmark = pytest.mark.e2e

RUNNING = [1, 2, 3, 4, 5]
DEMO = [1, 2, 3]  # the demo's layout: three sites, complete graph, t = 2


@pytest.fixture(scope="module")
def attacker(tmp_path_factory):
    # Each case is a new session, and most take a sum without sending its record: a site excuses
    # that (max_unrecorded) only so often in a run, and records are test_round_records's subject.
    with Attacker.running(tmp_path_factory.mktemp("attack"), RUNNING, policy=UNRECORDED_OK) as a:
        yield a


def assert_not_recovered(attacker, rnd: Round, site):
    true, _ = attacker.true_update(site, rnd.fit)
    assert np.max(np.abs(true)) > 0
    assert not matches(rnd.estimate(site), true, rnd.params)


# ---- control -------------------------------------------------------------------------------------


def test_control_an_honest_round_sums_to_the_true_updates(attacker):
    """The comparison the attack tests rely on can succeed: an honest round's unmasked sum equals
    the sum of the true updates computed here, to within the quantisation bound."""

    async def script(sessions):
        rnd = Round(attacker, sessions, DEMO)
        return rnd, await rnd.honest()

    rnd, total = attacker.case(script, sites=RUNNING)
    weighted, count = dequantize(total, rnd.params.plan)
    truths = [attacker.true_update(s, rnd.fit) for s in DEMO]
    assert count == sum(n for _, n in truths)
    assert np.max(np.abs(weighted - sum(t for t, _ in truths))) <= 3 / rnd.params.plan.scale + 1e-6
    # Even with every share an honest round reveals, no single site's update comes out.
    for site in DEMO:
        assert_not_recovered(attacker, rnd, site)


# ---- attack 1: isolation by selective delivery ---------------------------------------------------------


def test_isolation_by_selective_delivery(attacker):
    """Site 1 gets only site 2's shares (t - 1 suffice), then site 2 is called dropped."""

    async def script(sessions):
        rnd = Round(attacker, sessions, DEMO)
        await rnd.start()
        await rnd.roster()
        await rnd.deliver(lambda to, frm: to != 1 or frm == 2)
        assert 1 in rnd.masked  # site 1 masked, with site 2 only
        await rnd.consistency({1: [1, 3], 3: [1, 3]})
        await rnd.unmask({1: ([1, 3], [2]), 3: ([1, 3], [2])})
        return rnd

    rnd = attacker.case(script, sites=RUNNING)
    # Two survivors are too few, and site 3 is one it never masked with: either rule refuses.
    assert rule_of(rnd.declines[1]) in {"min_participants", "survivors"}
    assert_not_recovered(attacker, rnd, 1)


def test_isolation_of_a_pair_in_a_sparse_graph(attacker):
    """Five sites on a ring of degree 2: sites a and b mask only with each other, everyone around
    them is called dropped, and every other signature the attacker can get is forwarded."""

    async def script(sessions):
        rnd = Round(attacker, sessions, RUNNING)
        await rnd.start()
        graph = rnd.graph()
        a, b = 1, graph[1][0]
        around = (set(graph[a]) | set(graph[b])) - {a, b}
        await rnd.roster()
        await rnd.deliver(lambda to, frm: to not in (a, b) or frm in (a, b))
        survivors = [u for u in RUNNING if u not in around]
        await rnd.consistency({u: survivors for u in survivors})
        await rnd.unmask({u: (survivors, sorted(around)) for u in survivors})
        return rnd, a, b

    rnd, a, b = attacker.case(script, sites=RUNNING)
    assert {rule_of(rnd.declines[a]), rule_of(rnd.declines[b])} <= {"quorum", "component", "min_participants", "survivors"}
    for site in (a, b):
        assert_not_recovered(attacker, rnd, site)


# ---- attack 2: per-site round parameters ---------------------------------------------------------------


@pytest.mark.parametrize("change", [{"clip": 1e-9}, {"max_samples": 1}, {"scale": "x"}])
def test_a_different_quantisation_plan_for_other_sites(attacker, change):
    async def script(sessions):
        rnd = Round(attacker, sessions, DEMO)
        bent = attacker.start(rnd.params)
        bent = dataclasses.replace(bent, quant={**bent.quant, **change})
        await rnd.start(starts={2: bent, 3: bent})
        return rnd

    rnd = attacker.case(script, sites=RUNNING)
    assert rule_of(rnd.declines[2]) == rule_of(rnd.declines[3]) == "round_params"
    assert set(rnd.keys) == {1}  # site 1 advertised, but has no one to share with
    assert_not_recovered(attacker, rnd, 1)


def test_a_different_global_model_for_one_site(attacker):
    async def script(sessions):
        rnd = Round(attacker, sessions, DEMO)
        other = {k: v + 0.5 for k, v in rnd.fit.params.items()}
        await rnd.start(fits={3: dataclasses.replace(rnd.fit, params=other)})
        await rnd.roster()
        return rnd

    rnd = attacker.case(script, sites=RUNNING)
    assert {rule_of(r) for r in rnd.declines.values()} == {"signature"} and set(rnd.declines) == set(DEMO)
    assert rnd.shares == {}
    assert_not_recovered(attacker, rnd, 1)


def test_a_second_fitins_trains_nothing_the_round_did_not_sign(attacker):
    """Found in review: FitIns with model A, then the FitIns every site gets (model B), then
    SecAggStart; the site must not mask an update trained on A under a digest over B."""

    async def script(sessions):
        rnd = Round(attacker, sessions, DEMO)
        other = {k: v + 0.5 for k, v in rnd.fit.params.items()}
        await rnd.send(1, dataclasses.replace(rnd.fit, params=other))
        await rnd.start()
        await rnd.roster()
        await rnd.deliver()
        return rnd

    rnd = attacker.case(script, sites=RUNNING)
    assert rule_of(rnd.declines[1]) == "replay"
    assert 1 not in rnd.keys and 1 not in rnd.masked
    assert_not_recovered(attacker, rnd, 1)


def test_a_different_training_spec_for_one_site(attacker):
    other = RunSpec.model_validate(attacker.spec)
    other = other.model_copy(update={"train": other.train.model_copy(update={"lr": 0.5})}).wire()

    async def script(sessions):
        rnd = Round(attacker, sessions, DEMO)
        await rnd.start()
        await rnd.roster()
        return rnd

    # a run of its own: a run's spec is fixed for its run_id, so RUN's earlier spec would be refused first
    rnd = attacker.case(script, sites=RUNNING, spec=lambda site: other if site == 3 else attacker.spec,
                        run="one-site-respec")
    assert set(rnd.declines) == set(DEMO) and {rule_of(r) for r in rnd.declines.values()} == {"signature"}
    assert_not_recovered(attacker, rnd, 1)


# ---- attack 3: a round of one ------------------------------------------------------------------------


def test_a_round_of_one(attacker):
    async def script(sessions):
        rnd = Round(attacker, sessions, [1])
        start = dataclasses.replace(attacker.start(rnd.params), participants=[1], threshold=1)
        await rnd.start(starts={1: start})
        return rnd

    rnd = attacker.case(script, sites=RUNNING)
    assert rule_of(rnd.declines[1]) == "min_participants"
    assert_not_recovered(attacker, rnd, 1)


def test_survivors_padded_with_a_made_up_site(attacker):
    async def script(sessions):
        rnd = Round(attacker, sessions, DEMO)
        await rnd.start()
        await rnd.roster()
        await rnd.deliver()
        await rnd.consistency({1: [1, 2, 3, 999]})
        return rnd

    rnd = attacker.case(script, sites=RUNNING)
    assert rule_of(rnd.declines[1]) == "survivors"
    assert_not_recovered(attacker, rnd, 1)


def test_the_coordinator_cannot_pick_the_group_or_threshold(attacker):
    async def script(sessions):
        rnd = Round(attacker, sessions, RUNNING)  # the spec gives a ring of degree 2, t = 2
        start = attacker.start(rnd.params)
        await rnd.start(starts={1: dataclasses.replace(start, degree=0, threshold=1),
                                2: dataclasses.replace(start, degree=4, threshold=2)})
        return rnd

    rnd = attacker.case(script, sites=RUNNING)
    assert rule_of(rnd.declines[1]) == rule_of(rnd.declines[2]) == "round_params"


# ---- attack 4: downgrade -------------------------------------------------------------------------------


def _spec(attacker, **sections):
    spec = RunSpec.model_validate(attacker.spec)
    return spec.model_copy(update={k: getattr(spec, k).model_copy(update=v) for k, v in sections.items()}).wire()


@pytest.mark.parametrize("sections, rule", [
    ({"secagg": {"enabled": False}}, "require_secagg"),
    ({"dp": {"enabled": True, "target_epsilon": 50.0}}, "max_epsilon"),
    ({"dp": {"enabled": True, "target_delta": 0.1}}, "max_delta"),
    # issue 26, attack 2: the training settings a coordinator used to read one site's update
    ({"train": {"lr": 50.0}}, "train_bounds"),
    ({"train": {"local_steps": 5000}}, "train_bounds"),
    ({"train": {"local_epochs": 1, "local_steps": None}}, "train_bounds"),  # attack 3: a step count that follows the data size
    ({"train": {"batch_size": 1}}, "train_bounds"),
    ({"train": {"optimizer": "sgd", "momentum": 0.99}}, "train_bounds"),
    ({"train": {"augment": False}}, "train_bounds"),
    ({"model": {"width": 512}}, "model"),
    ({"secagg": {"max_samples_per_site": 1}}, "secagg_bounds"),
    ({"secagg": {"clip": 0.01}}, "secagg_bounds"),
])
def test_a_weaker_run_is_declined_for_good(attacker, sections, rule):
    spec = _spec(attacker, **sections)

    async def script(sessions):
        fit = attacker.fit_ins(next_round())
        await sessions[1].conn.send(fit)
        return await sessions[1].expect(), fit

    # a run of its own: under RUN, whose spec the sites hold already, they would refuse the change first
    reply, fit = attacker.case(script, sites=RUNNING, spec=spec, run=f"weaker-{rule}-{canonical_hash(spec)}")
    assert isinstance(reply, Decline) and reply.permanent and reply.rule == rule
    assert not isinstance(reply, FitRes)


def test_dp_switched_off_for_a_site_that_requires_it(attacker):
    site = 6
    proc = attacker.start_site(site, policy={"require_dp": True})
    try:
        async def script(sessions):
            await sessions[site].conn.send(attacker.fit_ins(next_round()))
            return await sessions[site].expect()

        reply = attacker.case(script, sites=[*RUNNING, site])
        assert isinstance(reply, Decline) and reply.permanent and reply.rule == "require_dp"
    finally:
        proc.kill()
        proc.wait()


# ---- attack 5: peers not pinned, and sybils against pinned peers -------------------------------------------


def test_a_site_without_pinned_peers_will_not_start(attacker):
    path = attacker.site_config(7 if 7 in attacker.site_keys else 1)
    text = path.read_text()
    start = text.index("peers:")
    end = text.index("reconnect:")
    path.write_text(text[:start] + text[end:])
    proc = subprocess.run([sys.executable, "-m", "asagiri.cli.client", "--site", "1", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    attacker.site_config(1)  # restore the running site's file
    assert proc.returncode == 2 and "peers: required" in proc.stderr


@pytest.mark.parametrize("who", ["sybil", "substituted keys"])
def test_keys_not_signed_by_the_pinned_identity(attacker, who):
    sybil = Identity.generate()

    async def script(sessions):
        rnd = Round(attacker, sessions, DEMO)
        await rnd.start()

        def forge(site, entries):
            if site != 1:
                return entries
            out = []
            for v, c, s, sig in entries:
                if v == 2:
                    c = s = EphemeralKey.generate().public
                    if who == "sybil":
                        from asagiri.secagg.binding import keys_message

                        sig = sybil.sign(keys_message(rnd.params.context, 2, c, s))
                out.append([v, c, s, sig])
            return out

        await rnd.roster(entries_for=forge)
        return rnd

    rnd = attacker.case(script, sites=RUNNING)
    assert rule_of(rnd.declines[1]) == "signature"
    assert 1 not in rnd.shares  # no share of site 1's secrets left it
    assert_not_recovered(attacker, rnd, 1)


# ---- refused before this issue, still refused --------------------------------------------------------------


def test_both_kinds_of_share_of_a_live_site(attacker):
    async def script(sessions):
        rnd = Round(attacker, sessions, DEMO)
        await rnd.start()
        await rnd.roster()
        await rnd.deliver()
        await rnd.consistency({s: DEMO for s in DEMO})
        await rnd.unmask({1: (DEMO, [2])})  # 2 survived, but its key share is asked for too
        return rnd

    rnd = attacker.case(script, sites=RUNNING)
    assert rule_of(rnd.declines[1]) == "survivors"
    assert_not_recovered(attacker, rnd, 2)


def test_competing_survivor_lists(attacker):
    """Sites 1-3 are told everyone survived, sites 4-5 that site 1 dropped: neither list gets a
    majority of the five participants' signatures, so neither is answered."""

    async def script(sessions):
        rnd = Round(attacker, sessions, RUNNING)
        await rnd.start()
        await rnd.roster()
        await rnd.deliver()
        without_1 = [2, 3, 4, 5]
        await rnd.consistency({1: RUNNING, 2: RUNNING, 4: without_1, 5: without_1})
        sigs = rnd.sigs
        rnd.sigs = {s: sig for s, sig in sigs.items() if s in (4, 5)}
        await rnd.unmask({4: (without_1, [1]), 5: (without_1, [1])})
        return rnd

    rnd = attacker.case(script, sites=RUNNING)
    assert rule_of(rnd.declines[4]) == rule_of(rnd.declines[5]) == "quorum"
    assert rnd.responses == []
    assert_not_recovered(attacker, rnd, 1)


def test_replay_after_a_site_restarts(attacker):
    fit = attacker.fit_ins(next_round())

    async def enter(sessions):
        rnd = Round(attacker, sessions, DEMO, fit=fit)
        await rnd.start()
        return rnd

    first = attacker.case(enter, sites=RUNNING)
    assert set(first.keys) == set(DEMO)
    # Site 1 restarts: its memory of round `fit.round` is only on disk now.
    proc = attacker.procs[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    attacker.start_site(1)
    again = attacker.case(enter, sites=RUNNING, timeout=120)
    assert rule_of(again.declines[1]) == "replay"
    assert 1 not in again.keys


# ---- the site keeps going ----------------------------------------------------------------------------


def test_a_malformed_plan_is_a_refusal_not_a_crash(attacker):
    async def script(sessions):
        rnd = Round(attacker, sessions, DEMO)
        start = attacker.start(rnd.params)
        await rnd.start(starts={1: dataclasses.replace(start, quant={**start.quant, "scale": "x", "bits": None})})
        return rnd

    rnd = attacker.case(script, sites=RUNNING)
    assert rule_of(rnd.declines[1]) == "round_params"
    assert attacker.procs[1].poll() is None


def test_an_injected_reject_does_not_stop_a_site(attacker):
    attacker.reject_once(1)
    assert attacker.procs[1].poll() is None

    async def script(sessions):
        return sorted(sessions)

    assert 1 in attacker.case(script, sites=RUNNING)  # it came back
    assert "the coordinator refused this site" in attacker.log(1)


def test_a_message_larger_than_the_model_closes_the_channel(attacker):
    async def script(sessions):
        huge = {"w": np.zeros(2 << 20, np.float32)}  # 8 MiB; the model is a few hundred KiB
        try:
            await sessions[1].conn.send(FitIns(next_round(), 1, huge, {}))
        except ConnectionLost:
            pass  # the site hung up on reading the header, before the tensor was through
        with anyio.fail_after(30):
            await sessions[1].closed.wait()
        return True

    assert attacker.case(script, sites=RUNNING)

    async def back(sessions):
        return sorted(sessions)

    assert 1 in attacker.case(back, sites=RUNNING)
    assert attacker.procs[1].poll() is None
    assert "tensors exceed the maximum payload" in attacker.log(1)


# ---- found in review: hostile but well-formed requests --------------------------------------------------


def test_a_model_that_breaks_evaluation_ends_the_session_not_the_site(attacker):
    """Finite float32 weights of 3e38 make the forward pass NaN, and scikit-learn refuses NaN scores."""

    async def script(sessions):
        params = {k: np.full_like(v, 3e38) for k, v in attacker.fit_ins(1).params.items()}
        await sessions[1].conn.send(EvaluateIns(next_round(), params, "val"))
        with anyio.fail_after(60):
            await sessions[1].closed.wait()
        return True

    assert attacker.case(script, sites=RUNNING)
    assert 1 in attacker.case(lambda sessions: _ids(sessions), sites=RUNNING)  # it came back
    assert attacker.procs[1].poll() is None
    assert "evaluate failed on what the coordinator sent" in attacker.log(1)


def test_a_spec_the_site_cannot_set_up_is_declined_not_a_crash(attacker):
    spec = _spec(attacker, data={"dataset": "isic"})  # valid, but this site has no ISIC files

    async def script(sessions):
        await sessions[1].conn.send(attacker.fit_ins(next_round()))
        return await sessions[1].expect()

    reply = attacker.case(script, sites=RUNNING, spec=spec, run="cannot-set-up")
    assert isinstance(reply, Decline) and reply.permanent and reply.rule == "setup"
    assert attacker.procs[1].poll() is None


# ---- issue 26, attack 3: the sample count, by differencing and through the step count -----------------


def _difference(attacker, with_site: list[int], without: list[int], *, spec=None, run=RUN, fit=None):
    """Two honest rounds on the same global model whose participants differ by one site: the
    difference of their sums is that site's input, weighted update and count slot."""
    fit = fit or attacker.fit_ins(next_round())
    totals = []
    for participants in (with_site, without):
        async def script(sessions, participants=participants):
            rnd = Round(attacker, sessions, participants, fit=attacker.fit_ins(next_round(), params=fit.params,
                                                                               config=fit.config), spec=spec)
            return rnd, await rnd.honest()

        rnd, total = attacker.case(script, sites=with_site, spec=spec, run=run, timeout=120)
        totals.append(dequantize(total, rnd.params.plan))
    (w1, c1), (w0, c0) = totals
    return w1 - w0, c1 - c0, rnd.params


def test_differencing_two_rounds_reads_one_not_the_sample_count(attacker):
    """Under the default policy (``count: one``) the count slot says 1 for every site, so the
    difference of two rounds that differ by site 4 says 1; the control, site 6 with
    ``count: exact``, gives its size away exactly, as every site did before issue 26."""
    _, count, _ = _difference(attacker, [1, 2, 3, 4], [1, 2, 3])
    size = len(attacker.worker(4).data.train)
    assert count == 1 and size >= 32  # the site's size (computed here) is not what the difference says

    site = 6
    proc = attacker.start_site(site, policy={"count": "exact"})
    try:
        _, count, _ = _difference(attacker, [1, 2, 3, site], [1, 2, 3])
    finally:
        proc.kill()
        proc.wait()
    assert count == len(attacker.worker(site).data.train)


def _dead_features(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A crafted small_cnn: the last block's normalisation outputs -1 for every input, so its ReLU
    is dead, and the head reads nothing; no example's gradient reaches any convolution, and
    weight decay alone moves the first one, by a factor of (1 - lr * wd) per local step."""
    out = {k: v.copy() for k, v in params.items()}
    out["features.9.weight"][:] = 0.0
    out["features.9.bias"][:] = -1.0
    out["head.weight"][:] = 0.0
    out["features.0.weight"][:] = 1.0
    return out


def _steps_read_off(delta: np.ndarray, params: dict[str, np.ndarray], lr: float, wd: float) -> float:
    """The attacker's estimate of the local steps from the first convolution of one site's update."""
    first = next(iter(params))
    assert first == "features.0.weight"
    d = np.median(delta[: params[first].size])
    return float(np.log1p(d) / np.log1p(-lr * wd))


WEIGHT_DECAY_PROBE = {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.01, "batch_size": 16}


def test_the_step_count_is_the_specs_not_the_sites_size(attacker):
    """The issue's weight-decay probe, within the default bounds: site 4's update, differenced out
    of two rounds (issue 27 closes that), shows how many local steps it took.  Under the default
    policy that is the spec's ``local_steps`` (20), whatever the site's size; the control, the
    same probe on the same site training in epochs (which the default policy refuses, see
    ``test_a_weaker_run_is_declined_for_good``), reads its size to within a batch."""
    spec = _spec(attacker, train=WEIGHT_DECAY_PROBE)
    fit = attacker.fit_ins(next_round())
    fit = attacker.fit_ins(fit.round, params=_dead_features(fit.params), config=fit.config)
    delta, count, params = _difference(attacker, [1, 2, 3, 4], [1, 2, 3], spec=spec, fit=fit,
                                       run=f"probe-{canonical_hash(spec)}")
    assert count == 1
    steps = _steps_read_off(delta, fit.params, lr=1.0, wd=0.01)
    assert abs(steps - 20) < 0.5, steps
    size = len(attacker.worker(4).data.train)
    assert abs(steps - size / 16) > 2  # what an epoch would have taken: not what the update shows

    # control: the same probe where the site trains one epoch (computed here, as the site would)
    by_epoch = _spec(attacker, train={**WEIGHT_DECAY_PROBE, "local_steps": None, "local_epochs": 1})
    worker = attacker.worker(4, by_epoch)
    d, result = worker.train(fit)
    read = _steps_read_off(np.clip(flatten(d), -1, 1), fit.params, lr=1.0, wd=0.01)
    assert round(read) == result.steps == -(-size // 16) - (1 if size % 16 == 1 else 0)


# ---- issue 26, attack 4: one colluding site signs two survivor lists -----------------------------------


def test_one_colluding_site_cannot_certify_two_survivor_lists(attacker):
    """Site 5 colludes (the attacker holds its key and what it holds).  Sites 1-2 are told that
    everyone survived, sites 3-4 that site 1 dropped, and site 5 signs both lists: with a plain
    majority quorum (3 of 5) both would be certified, site 1's self-mask seed would come from the
    first list and its masking key from the second (``test_adversarial``'s control shows that
    recovers site 1's input exactly).  The default quorum counts one colluder (4 of 5): every
    honest site refuses its list, and the attacker, holding only the colluder's shares, below the
    threshold, does not get site 1's true update out."""
    spec = _spec(attacker, secagg={"mode": "complete", "shares": None, "threshold": None})
    run = f"collude-{canonical_hash(spec)}"
    honest = [1, 2, 3, 4]

    async def script(sessions):
        attacker.run_id = run
        colluder = ColludingSite(attacker, 5, spec)
        everyone = {**sessions, 5: colluder}
        rnd = Round(attacker, everyone, [*honest, 5], spec=spec)
        await rnd.start()
        await rnd.roster()
        await rnd.deliver()
        assert set(rnd.masked) == {1, 2, 3, 4, 5}
        lists = {1: [1, 2, 3, 4, 5], 2: [1, 2, 3, 4, 5], 3: [2, 3, 4, 5], 4: [2, 3, 4, 5]}
        await rnd.consistency(lists)
        for site, survivors in lists.items():
            proof = [[v, rnd.sigs[v].masked_with, rnd.sigs[v].signature] for v in lists if lists[v] == survivors]
            proof.append(colluder.sign_survivors(rnd.params.context, survivors))
            dropped = sorted({1, 2, 3, 4, 5} - set(survivors))
            await rnd.send(site, UnmaskRequest(rnd.fit.round, rnd.fit.attempt, survivors, dropped, proof))
        replies = {site: await sessions[site].expect() for site in honest}
        return rnd, replies, colluder.held_shares(1)

    rnd, replies, (b_share, s_share) = attacker.case(script, sites=RUNNING, spec=spec, run=run, timeout=120)
    assert {site: declined(msg) for site, msg in replies.items()} == {site: "quorum" for site in honest}
    assert rnd.params.threshold == 3  # the colluder's one share of each of site 1's secrets is not enough
    rnd.responses = [UnmaskResponse(rnd.fit.round, rnd.fit.attempt, [[1, b_share]], []),
                     UnmaskResponse(rnd.fit.round, rnd.fit.attempt, [], [[1, s_share]])]
    true, _ = attacker.true_update(1, rnd.fit)
    assert np.max(np.abs(true)) > 0 and not matches(rnd.estimate(1), true, rnd.params)


async def _ids(sessions):
    return sorted(sessions)


def test_a_second_welcome_with_another_spec_in_the_same_run_is_declined(attacker):
    """Issue 26: the sites took seven re-Welcomes in one run. The run's spec is fixed for its
    run_id: the same site, welcomed again to the same run with a changed (but in-bounds) spec,
    declines for good, and the first spec still works."""
    async def joined(sessions):
        return sorted(sessions)

    async def script(sessions):
        await sessions[1].conn.send(attacker.fit_ins(next_round()))
        return await sessions[1].expect()

    assert attacker.case(joined, sites=RUNNING, run="respec-run") == RUNNING  # the first spec, accepted
    changed = _spec(attacker, train={"lr": 2e-3})
    reply = attacker.case(script, sites=RUNNING, spec=changed, run="respec-run")
    assert isinstance(reply, Decline) and reply.permanent and reply.rule == "spec_changed", reply
