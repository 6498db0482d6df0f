"""Secure aggregation end to end: real processes over TCP on loopback."""

import signal

import numpy as np
import pytest

from asagiri.observe.checkpoint import load_checkpoint
from asagiri.secagg.quantize import QuantPlan

pytestmark = pytest.mark.e2e

# One run id for the secure run and its plain control: W_0 is a function of the run id and the
# model (SPEC §6.9), so both start from the same model.
SPARSE_2_OF_3 = ["secagg.mode=sparse", "secagg.shares=3", "secagg.threshold=2", "min_clients=3",
                 "run_id=sparse-reference"]


def run_round(fed, victim_flag):
    fed.start_coordinator()
    for s in (1, 2, 4, 5):
        fed.start_site(s)
    victim = fed.start_site(3, *victim_flag)
    fed.events()
    assert fed.coordinator.wait(timeout=180) == 0, fed.logs()
    assert victim.wait(timeout=10) == -signal.SIGKILL
    params, _, state = load_checkpoint(fed.root / "checkpoint.npz")
    return params, fed.metrics()[0]


def test_sparse_2_of_3_with_a_site_killed_after_sharing_keys_equals_the_plain_sum(fed_factory):
    secure = fed_factory("secure", sites=5, rounds=1, overrides=SPARSE_2_OF_3, batches=False)
    params_secure, rec = run_round(secure, ["--kill-at", "share:1"])
    assert rec["secure_aggregation"] is True
    stages = rec["secagg_stages"]
    assert 3 in stages["shared"] and 3 not in stages["masked"]  # it really died after sharing
    assert rec["participants"] == [1, 2, 4, 5] and rec["dropped"] == [3]
    secure.audit()  # the chain and every signature verify

    # The same round in the clear, with site 3 gone before training: the reference sum.
    plain = fed_factory("plain", sites=5, rounds=1, overrides=[*SPARSE_2_OF_3, "secagg.enabled=false"], batches=False)
    params_plain, rec_plain = run_round(plain, ["--kill-at", "fit:1"])
    assert rec_plain["secure_aggregation"] is False and rec_plain["participants"] == [1, 2, 4, 5]

    assert params_secure.keys() == params_plain.keys()
    worst = max(float(np.max(np.abs(params_secure[k] - params_plain[k]))) for k in params_plain)
    # docs/secagg.md: the weighted sum is off by < survivors / scale per value, so the mean by
    # < survivors / (scale * N), N the counts' sum: 4 survivors counting one each (the default
    # policy's count); plus float32 rounding of the applied step.
    cfg = secure.cfg
    plan = QuantPlan.plan(bits=cfg.secagg.bits, clip=cfg.secagg.clip,
                          max_samples=cfg.secagg.max_samples_per_site, max_sites=5)
    bound = 4 / (plan.scale * 4) + 1e-6
    assert worst <= bound, (worst, bound)
    moved = max(float(np.max(np.abs(params_plain[k]))) for k in params_plain)
    assert moved > 0


def test_a_run_with_secure_aggregation_off_is_refused_by_every_site(fed_factory):
    """The downgrade, with the real coordinator: fed.yaml turns secure aggregation off, and sites
    whose policy requires it decline the run for good; no update ever leaves them."""
    fed = fed_factory("downgrade", sites=3, rounds=2, overrides=["secagg.enabled=false"],
                      site_policy={"require_secagg": True})
    events, codes = fed.run([1, 2, 3])
    # the run did not do what it was for: the coordinator says so, in one line, and exits 3
    assert codes == {"coordinator": 3, "site-1": 0, "site-2": 0, "site-3": 0}, fed.logs()
    assert "error: federation ends before round 1: sites [1, 2, 3] refused the run by their policy" in \
        (fed.root / "logs" / "coordinator.log").read_text()
    [ended] = [e for e in events if e["event"] == "FederationEnded"]
    assert ended["status"] == "refused_by_sites" and "refused the run by their policy" in ended["message"], events
    refusals = [e for e in events if e["event"] == "SiteRefused"]
    assert {e["site"] for e in refusals} == {1, 2, 3} and all(e["rule"] == "require_secagg" for e in refusals)
    assert fed.summary()["status"] == "refused_by_sites" and fed.metrics() == []
    for s in (1, 2, 3):
        log = (fed.root / "logs" / f"site-{s}.log").read_text()
        assert "refused (require_secagg)" in log and "trained on" not in log
