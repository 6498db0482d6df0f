"""A federation in one process (``asagiri.local``): the product's handshake, channel, sessions,
driver, recorder, site workers and secure-aggregation machines, with memory instead of sockets."""

import json
import math
from functools import partial

import anyio
import numpy as np
import pytest

from asagiri.initial import initial_params
from asagiri.local import lay_out, run_local
from asagiri.observe.checkpoint import load_checkpoint
from asagiri.secagg.plan import QuantPlan
from asagiri.signedlog import RECEIPT_DOMAIN, read_log, verify_log
from asagiri.wire.crypto import PublicIdentity

FAST = ["data.dataset=synthetic", "data.synthetic_samples=192", "data.partition.scheme=iid", "model.width=8",
        "train.local_steps=5", "timeouts.heartbeat_interval=1", "timeouts.heartbeat_timeout=10"]


def test_a_secure_federation_runs_in_memory_and_reports_typed_events(tmp_path):
    cfg, sites = lay_out(tmp_path, sites=3, rounds=2, overrides=FAST)
    seen = []
    summary = anyio.run(lambda: run_local(cfg, sites, watchers=[seen.append]))
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    kinds = [type(e).__name__ for e in seen]
    assert kinds[-2:] == ["TestScored", "FederationEnded"]
    for rnd in (1, 2):
        started = [e for e in seen if type(e).__name__ == "RoundStarted" and e.round == rnd]
        assert len(started) == 1 and started[0].secure and started[0].selected == [1, 2, 3]
        assert sorted(e.site for e in seen if type(e).__name__ == "UpdateReceived" and e.round == rnd) == [1, 2, 3]
    completed = [e.record for e in seen if type(e).__name__ == "RoundCompleted"]
    assert [r["round"] for r in completed] == [1, 2] and all(r["secure_aggregation"] for r in completed)
    # the recorder wrote the same files a TCP run writes
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    key = PublicIdentity.from_hex((tmp_path / "keys" / "coordinator.pub").read_text())
    assert verify_log(tmp_path / "audit.jsonl", key) == (len(read_log(tmp_path / "audit.jsonl")), None)
    kinds = [r["kind"] for r in read_log(tmp_path / "audit.jsonl")]
    assert kinds[0] == "run_started" and kinds.count("site_joined") == 3 and kinds[-1] == "federation_ended"
    assert kinds.count("round_completed") == 2
    _, _, state = load_checkpoint(tmp_path / "checkpoint.npz")
    assert state["round"] == 2 and summary["model_sha256"] == state["model_sha256"]


def test_secure_and_plain_aggregation_give_the_same_model_in_memory(tmp_path):
    """The same round with secure aggregation on and off: the global models agree, so the in-memory
    path really sums the sites' updates.  A 64-bit ring makes the quantisation error (below
    sites / (scale * total samples), about 1e-5 at 32 bits here) vanish next to float32's."""
    models, start = {}, None
    for secure in (True, False):
        cfg, sites = lay_out(tmp_path / str(secure), sites=3, rounds=1,
                             overrides=[*FAST, f"secagg.enabled={str(secure).lower()}", "secagg.bits=64"])
        # the secure run's sites start from the W_0 they derive from its spec; the plain run, whose
        # spec differs, is given the same model to start from
        start = initial_params(cfg) if start is None else start
        anyio.run(partial(run_local, cfg, sites, initial=start))
        models[secure], _, _ = load_checkpoint(tmp_path / str(secure) / "checkpoint.npz")
    moved = 0.0
    for k in models[True]:
        np.testing.assert_allclose(models[True][k], models[False][k], rtol=1e-5, atol=1e-7, err_msg=k)
        moved = max(moved, float(np.abs(models[True][k]).max()))
    assert moved > 0


def test_a_site_that_never_connects_leaves_the_others_to_finish(tmp_path):
    cfg, sites = lay_out(tmp_path, sites=3, rounds=1,
                         overrides=[*FAST, "min_clients=2", "secagg.enabled=false", "timeouts.wait_for_sites=2"])
    del sites[3]
    summary = anyio.run(run_local, cfg, sites)
    assert summary["status"] == "completed"
    [record] = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["participants"] == [1, 2]


def test_resume_in_memory_continues_from_the_checkpoint(tmp_path):
    cfg, sites = lay_out(tmp_path, sites=3, rounds=2, overrides=[*FAST, "secagg.enabled=false"])

    class Stop(Exception):
        pass

    def stop_after_round_one(event):  # the run dies right after round 1 was recorded
        if type(event).__name__ == "RoundCompleted" and event.record["round"] == 1:
            raise Stop

    with pytest.raises(BaseExceptionGroup) as caught:
        anyio.run(lambda: run_local(cfg, sites, watchers=[stop_after_round_one]))
    assert caught.group_contains(Stop)
    summary = anyio.run(lambda: run_local(cfg, sites, resume=True))
    assert summary["rounds_completed"] == 2
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_each_sites_receipts_expose_a_coordinator_that_rewrites_its_own_signed_log(tmp_path):
    """The coordinator holds its signing key, so it can rewrite its audit log whole and re-sign it:
    the chain verifies. The records it signed and sent each site, kept in the site's own signed
    receipts, still show it."""
    from asagiri.observe.audit import check_receipts
    from asagiri.signedlog import SignedLog
    from asagiri.wire.crypto import Identity

    cfg, sites = lay_out(tmp_path, sites=3, rounds=2, overrides=FAST)
    anyio.run(lambda: run_local(cfg, sites))
    audit = tmp_path / "audit.jsonl"
    key = PublicIdentity.from_hex((tmp_path / "keys" / "coordinator.pub").read_text())
    site_keys = {s: PublicIdentity.from_hex((tmp_path / "keys" / f"site-{s}.pub").read_text()) for s in (1, 2, 3)}
    receipts = {s: tmp_path / "sites" / f"site-{s}" / "receipts.jsonl" for s in (1, 2, 3)}
    original = read_log(audit)
    last_round = max(r["seq"] for r in original if r["kind"] == "round_completed")
    for s in (1, 2, 3):
        check = check_receipts(audit, receipts[s], site_keys[s], key)
        assert (check.checked, check.problems, check.pinned) == (2, [], last_round)
        # each receipt is the coordinator's record as its log holds it, checked by the site
        kept = [r for r in read_log(receipts[s]) if r["kind"] == "round_receipt"]
        assert [r["record"] for r in kept] == [r for r in original if r["kind"] == "round_completed"]
        assert all(r["evaluated"] for r in kept)
        # and its own word of each attempt it contributed to, as it happened
        assert [r["round"] for r in read_log(receipts[s]) if r["kind"] == "round_contributed"] == [1, 2]
    # the model in round 2's record is the final checkpoint's
    _, _, state = load_checkpoint(tmp_path / "checkpoint.npz")
    assert kept[-1]["record"]["model_sha256"] == state["model_sha256"]

    coordinator = Identity.load(tmp_path / "keys" / "coordinator.key")

    def rewrite(keep):
        """The coordinator's rewrite: the records ``keep`` returns, re-chained and re-signed with its key."""
        audit.unlink()
        log = SignedLog(audit, coordinator)
        for r in original:
            kept = keep(dict(r))
            for r in kept if isinstance(kept, list) else [kept] if kept is not None else []:
                log.append(**{k: v for k, v in r.items() if k not in ("seq", "prev_hash", "hash", "signer", "sig")})
        assert verify_log(audit, key)[1] is None  # the chain alone cannot tell

    def edit(field, value, kind="round_completed"):
        return lambda r: {**r, field: value} if r["kind"] == kind and r.get("round", 1) == 1 else r

    # any field of round 1's record: its model, who took part, the privacy spent
    for change in (edit("model_sha256", "ab" * 32), edit("participants", [1, 2]), edit("epsilon", {"1": 0.1})):
        rewrite(change)
        for s in (1, 2, 3):
            problems = check_receipts(audit, receipts[s], site_keys[s], key).problems
            assert problems and all("is not the one the coordinator signed and sent this site" in p
                                    for p in problems), problems
    # a record before the first round's: one receipt pins everything before it
    rewrite(lambda r: {**r, "fingerprint": "0" * 16} if r["kind"] == "site_joined" else r)
    assert len(check_receipts(audit, receipts[1], site_keys[1], key).problems) == 2
    rewrite(lambda r: None if r["kind"] == "round_completed" and r["round"] == 2 else r)  # cut round 2 out
    problems = check_receipts(audit, receipts[1], site_keys[1], key).problems
    assert any("rewritten, or a fork" in p or "(cut short)" in p for p in problems)
    rewrite(lambda r: r if r["seq"] <= last_round - 1 else None)  # cut off at round 2
    [problem] = check_receipts(audit, receipts[1], site_keys[1], key).problems
    assert f"the log has no record {last_round}" in problem and "(cut short)" in problem
    # a log with no run_started, so that no receipt seems to be of this run
    rewrite(lambda r: None if r["kind"] == "run_started" else r)
    assert "no run_started record names the run" in check_receipts(audit, receipts[1], site_keys[1], key).problems[0]
    # or with round 1 recorded twice, once with the sites' model and once with another
    rewrite(lambda r: [r, edit("model_sha256", "ab" * 32)(dict(r))]
            if r["kind"] == "round_completed" and r["round"] == 1 else r)
    problems = check_receipts(audit, receipts[1], site_keys[1], key).problems
    assert any("round 1 completed twice with no resume between" in p for p in problems)
    # or naming another run: the operator says which run they mean
    rewrite(lambda r: {**r, "run_id": "another"} if r["kind"] == "run_started" else r)
    problems = check_receipts(audit, receipts[1], site_keys[1], key, run_id=cfg.run_id).problems
    assert any("no run_started record for run" in p for p in problems)
    assert "no receipt of run 'another'" in check_receipts(audit, receipts[1], site_keys[1], key).problems[0]
    # a site's receipts are themselves signed: a receipt forged by the coordinator is caught
    rewrite(lambda r: r)
    forged = receipts[2].read_text().splitlines()
    at = next(i for i, line in enumerate(forged) if json.loads(line)["kind"] == "round_receipt")
    rec = json.loads(forged[at])
    rec["record"]["model_sha256"] = "ab" * 32
    forged[at] = json.dumps(rec, sort_keys=True)
    receipts[2].write_text("\n".join(forged) + "\n")
    [problem] = check_receipts(audit, receipts[2], site_keys[2], key).problems
    assert "hash does not match the contents" in problem
    # and a hostile site cannot make up a record: its receipts verify, the record in them does not
    site2 = Identity.load(tmp_path / "keys" / "site-2.key")
    receipts[2].unlink()
    made_up = {k: v for k, v in rec["record"].items()}
    SignedLog(receipts[2], site2, domain=RECEIPT_DOMAIN).append(
        "round_receipt", run_id=cfg.run_id, round=1, site=2, evaluated=True, record=made_up)
    [problem] = check_receipts(audit, receipts[2], site_keys[2], key).problems
    assert "not signed by the coordinator for this run and round (the site's word only)" in problem
    # nor file a genuine record under another round
    receipts[2].unlink()
    SignedLog(receipts[2], site2, domain=RECEIPT_DOMAIN).append(
        "round_receipt", run_id=cfg.run_id, round=2, site=2, evaluated=True, record=kept[0]["record"])
    [problem] = check_receipts(audit, receipts[2], site_keys[2], key).problems
    assert "(the site's word only)" in problem


@pytest.mark.parametrize("secure", [True, False])
def test_max_update_norm_bounds_how_far_one_round_moves_the_model(tmp_path, secure):
    """Each site scales its update to ``train.max_update_norm``, so the weighted average of the
    updates (all the coordinator applies) moves the model by at most the bound; without the bound
    the same round moves it further, so the bound did the work.  Under secure aggregation the
    coordinator never saw an update, yet the sum is bounded."""
    from asagiri.initial import initial_params
    from asagiri.params import update_norm

    moves = {}
    for bound in (None, 0.05):
        run_dir = tmp_path / str(bound)
        extra = [] if bound is None else [f"train.max_update_norm={bound}"]
        cfg, sites = lay_out(run_dir, sites=3, rounds=1,
                             overrides=[*FAST, f"secagg.enabled={str(secure).lower()}", *extra])
        anyio.run(run_local, cfg, sites)
        after, _, _ = load_checkpoint(run_dir / "checkpoint.npz")
        before = initial_params(cfg)
        moves[bound] = update_norm({k: after[k] - before[k] for k in before})
    # plus, under secure aggregation, the fixed-point rounding: below 1/scale per coordinate of the
    # mean (each site's rounding error is below 1/scale, and every site counts as one sample)
    q = cfg.secagg
    plan = QuantPlan.plan(bits=q.bits, clip=q.clip, max_samples=q.max_samples_per_site, max_sites=3)
    rounding = math.sqrt(sum(v.size for v in before.values())) / plan.scale if secure else 0.0
    assert moves[0.05] <= 0.05 * (1 + 1e-3) + rounding, moves
    assert moves[None] > 2 * 0.05, moves


def test_a_site_that_refuses_the_run_for_good_ends_a_run_whose_one_batch_it_was_in(tmp_path):
    """Four sites in one participation batch (the default cut); site 4 requires DP-SGD, which the
    run lacks, and declines for good. No round can sum a whole batch again: the run ends at once,
    naming the refusal, instead of waiting for a batch that cannot come back."""
    cfg, sites = lay_out(tmp_path, sites=4, rounds=2, overrides=[*FAST, "min_clients=3", "timeouts.wait_for_sites=20"],
                         site_extra={4: {"policy": {"require_dp": True, "share_predictions": True}}})
    assert cfg.participation_batches() == [[1, 2, 3, 4]]
    summary = anyio.run(run_local, cfg, sites)
    # a refusal by policy is not a spent budget: the summary names the site's rule, apart
    assert summary["status"] == "refused_by_sites" and summary["refused"] == {"4": "require_dp"}, summary
    assert summary["exhausted"] == [], summary


def test_a_site_whose_data_cannot_be_loaded_is_named_as_refusing_setup_never_as_out_of_budget(tmp_path):
    """Issue 28: a site whose data file would not load was listed under ``exhausted``, as if its
    privacy budget were spent.  It declines by the ``setup`` rule, and the summary says so."""
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not an npz file")
    cfg, sites = lay_out(tmp_path / "run", sites=3, rounds=1,
                         overrides=["data.dataset=pneumoniamnist", "model.width=8", "train.local_steps=5",
                                    "timeouts.wait_for_sites=20"],
                         site_extra={3: {"data_path": str(broken)}})
    summary = anyio.run(run_local, cfg, sites)
    assert summary["status"] == "refused_by_sites", summary
    assert summary["refused"] == {"3": "setup"} and summary["exhausted"] == [], summary
    assert "refused the run by their policy" in summary["message"]


def test_a_run_repeated_under_its_run_id_fails_naming_the_replay_and_its_fix(tmp_path):
    """A newcomer's finding: the same project run again (a new run_dir, the sites' state kept)
    failed with "aborted 3 times" and nothing on why.  Every site declines by its replay rule,
    and the failure says so, with the fix."""
    import json

    cfg, sites = lay_out(tmp_path / "run", sites=3, rounds=1, overrides=[*FAST, "run_id=twice", "max_round_attempts=2",
                                                                         "timeouts.wait_for_sites=20"])
    assert anyio.run(run_local, cfg, sites)["status"] == "completed"
    again = cfg.model_copy(update={"run_dir": tmp_path / "again"})
    with pytest.raises(BaseException) as raised:
        anyio.run(run_local, again, sites)
    assert "federation failed at round 1" in str(raised.value) or raised.value.exceptions  # (a group, in process)
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert "replay (sites [1, 2, 3]; they entered this round of this run_id before" in summary["message"]
    assert "new run_id" in summary["message"]
