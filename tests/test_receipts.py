"""A site's checks of the coordinator's round records (``site/receipts.py``) and the verifier that
holds a log against them (``observe/audit.py``), in process: each case is a way a coordinator
running modified code could abuse the records, or an honest situation that must not look like one
(found by a red-team review of the change)."""

from __future__ import annotations

import json

import pytest

from asagiri.config import PolicyConfig
from asagiri.observe.audit import check_receipts
from asagiri.policy import Refusal, SitePolicy
from asagiri.signedlog import RECEIPT_DOMAIN, SignedLog, line_of, read_log, verify_log
from asagiri.site.receipts import RoundWitness
from asagiri.wire.crypto import Identity
from asagiri.wire.messages import RoundRecord

RUN = "run"
COORDINATOR, SITE = Identity.from_seed(b"\1" * 32), Identity.from_seed(b"\2" * 32)
MODEL = "aa" * 32


class Log:
    """A coordinator's audit log, written as the recorder writes it."""

    def __init__(self, path, run=RUN, time=1.0):
        self.path, self.run = path, run
        self.log = SignedLog(path, COORDINATOR)
        self.started = self.log.append("run_started", run_id=run, first_round=1, resumed=False, time=time)["seq"]

    def restart(self):
        self.started = self.log.append("run_started", run_id=self.run, first_round=1, resumed=True)["seq"]

    def round(self, rnd, attempt=1, **fields):
        body = {"run_id": self.run, "log_id": self.log.first_hash, "started": self.started, "round": rnd,
                "attempt": attempt, "selected": [1, 2, 3], "participants": [1, 2, 3], "dropped": [], "declined": {},
                "model_sha256": MODEL, "epsilon": {}, "noise_multiplier": {}, **fields}
        return RoundRecord(rnd, line_of(self.log.append("round_completed", **body)))


def witness(path):
    return RoundWitness(SignedLog(path, SITE, domain=RECEIPT_DOMAIN), COORDINATOR.public, 1,
                        SitePolicy(PolicyConfig()))


@pytest.fixture
def setup(tmp_path):
    return Log(tmp_path / "audit.jsonl"), witness(tmp_path / "receipts.jsonl"), tmp_path / "receipts.jsonl"


def kinds(path):
    """The receipts and disputes a site kept (its notes of the attempts it contributed to aside)."""
    return [r["kind"] for r in read_log(path) if r["kind"] not in ("round_contributed", "round_aborted")]


def took_part(w, rnd, attempt=1, survivors=(1, 2, 3)):
    w.asked(RUN, rnd, attempt)
    w.sent_update(RUN, rnd, attempt)
    w.signed_survivors(RUN, rnd, attempt, list(survivors))


def kept_round_one(log, w):
    """A session in which the site evaluated round 1 and kept its record."""
    w.joined(RUN)
    w.settle(RUN)
    w.evaluated(RUN, 1, MODEL, {})
    w.record(RUN, log.round(1))


def check(log, receipts):
    return check_receipts(log.path, receipts, SITE.public, COORDINATOR.public, run_id=RUN)


# ---- a record withheld -------------------------------------------------------------------------------


def test_a_withheld_record_cannot_be_skipped_in_the_same_session(setup):
    log, w, _ = setup
    w.joined(RUN)
    w.settle(RUN)
    w.evaluated(RUN, 1, MODEL, {})
    for rnd in (1, 2):  # the same round asked again, or the next: both wait for the record
        with pytest.raises(Refusal, match="record"):
            w.before_fit(RUN, rnd, 1)
    assert not w.disputed(RUN)
    with pytest.raises(Refusal, match="none of round 1"):  # a later round's record, skipping it
        w.record(RUN, log.round(2))
    assert w.disputed(RUN)


def test_a_site_that_contributed_enters_no_later_round_until_that_rounds_record_or_abort(setup):
    """Issue 26, attack 5: a coordinator that never sends a record of a round the site sent an
    update in (it need not ask for an evaluation) gets no further update from it."""
    log, w, _ = setup
    w.joined(RUN)
    w.settle(RUN)
    w.asked(RUN, 1, 1)
    w.sent_update(RUN, 1, 1)
    for rnd, attempt in ((1, 2), (2, 1), (33, 1)):
        with pytest.raises(Refusal, match=r"record \(or abort\) of round 1.1"):
            w.before_fit(RUN, rnd, attempt)
    w.aborted(RUN, 1, 1)  # the abort of that attempt frees the retry ...
    w.before_fit(RUN, 1, 2)
    w.asked(RUN, 1, 2)
    w.sent_update(RUN, 1, 2)
    with pytest.raises(Refusal, match="record"):  # ... but not the next round: attempt 2 is unrecorded
        w.before_fit(RUN, 2, 1)
    w.record(RUN, log.round(1, attempt=2))  # site 1 is among its participants
    w.before_fit(RUN, 2, 1)  # its record came: the site goes on
    assert not w.disputed(RUN)


def witness_with(path, **policy):
    return RoundWitness(SignedLog(path, SITE, domain=RECEIPT_DOMAIN), COORDINATOR.public, 1,
                        SitePolicy(PolicyConfig(**policy)))


def dodge(w, rnd):
    """A session in which the site contributes to round ``rnd``, then a new session whose log ends
    before it (no join record): the coordinator reconnected instead of sending the record."""
    w.joined(RUN)
    w.settle(RUN)
    w.before_fit(RUN, rnd, 1)
    took_part(w, rnd)
    w.joined(RUN)
    w.settle(RUN)


def test_reconnecting_instead_of_recording_is_excused_only_max_unrecorded_times(tmp_path):
    """Red-team finding: a new session used to forget the attempts a site contributed to, so a
    coordinator that reconnected after every round never had to send a record.  Each one is now
    the site's signed word (``round_unrecorded``), and past ``max_unrecorded`` the site leaves."""
    path = tmp_path / "receipts.jsonl"
    w = witness_with(path, max_unrecorded=2)
    for rnd in (1, 2):
        dodge(w, rnd)
    w.before_fit(RUN, 3, 1)  # two excused
    took_part(w, 3)
    w.joined(RUN)
    w.settle(RUN)
    with pytest.raises(Refusal, match="3 rounds of this run went unrecorded"):
        w.before_fit(RUN, 4, 1)
    owed = [(r["round"], r["attempt"]) for r in read_log(path) if r["kind"] == "round_unrecorded"]
    assert owed == [(1, 1), (2, 1), (3, 1)]
    # the verifier reads them as the site's word: notes for a reader, not contradictions
    log = Log(tmp_path / "audit.jsonl")
    result = check(log, path)
    assert len(result.notes) == 3 and "contributed to round 1 attempt 1" in result.notes[0]
    assert all("no receipt of run" in p for p in result.problems)
    # ... restarted or not: the count is read back from its receipts
    with pytest.raises(Refusal, match="3 rounds of this run went unrecorded"):
        witness_with(path, max_unrecorded=2).before_fit(RUN, 4, 1)


def test_an_attempt_the_log_has_passed_is_not_excused_but_checked_in_the_log(tmp_path):
    """The site contributed to round 2 and was away; it rejoins when the log has reached round 3.
    It does not count that against ``max_unrecorded`` (the log claims to have moved past it), and
    the verifier requires the log to hold round 2's record or abort: here it holds neither."""
    path = tmp_path / "receipts.jsonl"
    log, w = Log(tmp_path / "audit.jsonl"), witness_with(path, max_unrecorded=0)
    w.joined(RUN)
    w.settle(RUN)
    w.record(RUN, log.round(1))
    took_part(w, 2)
    w.joined(RUN)
    w.record(RUN, log.round(3))  # the join record: the log passed round 2 without a record of it
    w.before_fit(RUN, 4, 1)  # not excused against the cap
    [owed] = [r for r in read_log(path) if r["kind"] == "round_unrecorded"]
    assert owed["log_passed"] is True and owed["attempt"] == 1
    [problem] = check(log, path).problems
    assert "holds no record or abort of that attempt (the log had passed that round with no resume" in problem


def test_an_abort_after_the_site_revealed_its_shares_counts_as_unrecorded(tmp_path):
    """Red-team finding: the coordinator ran the whole round, took the unmask shares, then said
    the attempt aborted (``unmask_failed`` is a real cause), which used to excuse it for free."""
    path = tmp_path / "receipts.jsonl"
    w = witness_with(path, max_unrecorded=1)
    w.joined(RUN)
    w.settle(RUN)
    for rnd in (1, 2):
        w.before_fit(RUN, rnd, 1)
        took_part(w, rnd)
        w.unmasked(RUN, rnd, 1)
        w.aborted(RUN, rnd, 1)
    with pytest.raises(Refusal, match="2 rounds of this run went unrecorded"):
        w.before_fit(RUN, 3, 1)
    with pytest.raises(Refusal, match="2 rounds of this run went unrecorded"):  # restarted too
        witness_with(path, max_unrecorded=1).before_fit(RUN, 3, 1)
    # an abort before the site revealed anything is free, as before
    fresh = witness_with(tmp_path / "other.jsonl", max_unrecorded=0)
    fresh.joined(RUN)
    fresh.settle(RUN)
    took_part(fresh, 1)
    fresh.aborted(RUN, 1, 1)
    fresh.before_fit(RUN, 1, 2)


def abort_record(log, rnd, attempt, **fields):
    body = {"run_id": log.run, "log_id": log.log.first_hash, "started": log.started, "round": rnd,
            "attempt": attempt, "cause": "unverified", **fields}
    return RoundRecord(rnd, line_of(log.log.append("round_aborted", **body)))


def test_an_abort_after_unmasking_is_excused_once_its_signed_record_comes(tmp_path):
    """An attempt ended unverified (a survivor gone before it vouched, SPEC §6.8) after the site
    revealed its shares: once the coordinator's signed record of the abort comes, the abort is in
    its log and does not count against ``max_unrecorded``, restarts included."""
    log, path = Log(tmp_path / "audit.jsonl"), tmp_path / "receipts.jsonl"
    w = witness_with(path, max_unrecorded=0)
    w.joined(RUN)
    w.settle(RUN)
    for attempt in (1, 2, 3):
        w.before_fit(RUN, 1, attempt)
        took_part(w, 1, attempt)
        w.unmasked(RUN, 1, attempt)
        w.aborted(RUN, 1, attempt)
        w.record(RUN, abort_record(log, 1, attempt))
    w.before_fit(RUN, 1, 4)
    witness_with(path, max_unrecorded=0).before_fit(RUN, 1, 4)
    # a record of another run's abort is a dispute, as any false record is
    other = witness_with(tmp_path / "other.jsonl", max_unrecorded=0)
    other.joined(RUN)
    with pytest.raises(Refusal, match="a round_aborted record of run 'elsewhere'"):
        other.record(RUN, abort_record(log, 1, 1, run_id="elsewhere"))


def test_a_made_up_join_record_that_passes_an_owed_round_is_caught_by_the_verifier(tmp_path):
    """Red-team finding: after taking round 2's sum, the coordinator reconnects with a freshly
    signed record of round 10**9, so the owed attempt looks passed and is not counted.  The site
    keeps that record whole; the verifier finds it is not the log's."""
    path = tmp_path / "receipts.jsonl"
    log, w = Log(tmp_path / "audit.jsonl"), witness_with(path)
    w.joined(RUN)
    w.settle(RUN)
    w.record(RUN, log.round(1))
    took_part(w, 2)
    forged = Log(tmp_path / "forged.jsonl")  # the coordinator's key, a log nobody else sees
    w.joined(RUN)
    w.record(RUN, forged.round(10**9))
    problems = check(log, path).problems
    assert any("is not the log's record at that seq: made up" in p for p in problems), problems


def test_an_attempt_left_behind_by_a_new_run_id_is_written_down(tmp_path):
    """Red-team finding: reconnecting the site to another run id orphaned the owed attempt, and
    the verifier of the first run saw nothing."""
    path = tmp_path / "receipts.jsonl"
    log, w = Log(tmp_path / "audit.jsonl"), witness_with(path)
    w.joined(RUN)
    w.settle(RUN)
    took_part(w, 1)
    w.joined("run-b")
    [owed] = [r for r in read_log(path) if r["kind"] == "round_unrecorded"]
    assert (owed["run_id"], owed["round"], owed["left_for"]) == (RUN, 1, "run-b")
    assert any("contributed to round 1 attempt 1" in n for n in check(log, path).notes)


def test_a_site_restart_does_not_forget_an_attempt_it_contributed_to(tmp_path):
    path = tmp_path / "receipts.jsonl"
    w = witness_with(path)
    w.joined(RUN)
    w.settle(RUN)
    took_part(w, 1)
    again = witness_with(path)  # the site process restarted, the same session's coordinator goes on
    with pytest.raises(Refusal, match=r"record \(or abort\) of round 1.1"):
        again.before_fit(RUN, 2, 1)
    again.aborted(RUN, 1, 1)  # its abort came: written, and so read back too
    again.before_fit(RUN, 1, 2)
    witness_with(path).before_fit(RUN, 1, 2)
    assert [r["kind"] for r in read_log(path)] == ["round_contributed", "round_aborted"]


def test_a_record_settles_a_contributed_attempt_across_a_restart(setup, tmp_path):
    log, w, path = setup
    w.joined(RUN)
    w.settle(RUN)
    took_part(w, 1)
    w.record(RUN, log.round(1))
    witness(path).before_fit(RUN, 2, 1)  # restarted: the receipt of round 1 settles its attempt


def test_after_a_restart_the_site_keeps_its_own_word_and_the_verifier_compares_it(setup):
    log, w, receipts = setup
    w.joined(RUN)
    w.settle(RUN)
    w.evaluated(RUN, 1, MODEL, {})
    # the coordinator restarted: a new process whose log ends before round 1
    log.restart()
    w.joined(RUN)
    w.settle(RUN)  # the FitIns of the redo came first: no join record (no round in the log)
    w.before_fit(RUN, 1, 1)
    assert kinds(receipts) == ["round_unrecorded"]
    w.record(RUN, log.round(1, model_sha256="bb" * 32))  # the redo's model is not the one it saw
    assert not w.disputed(RUN)
    # the verifier: a resume lies between, so the claim is reported as the site's word, not proof
    [problem] = check(log, receipts).problems
    assert "the site's word" in problem and "a resume before that record" in problem


def test_a_join_record_of_the_same_process_is_checked(setup):
    """Connection lost between evaluating and the record: the same coordinator process's record on
    joining is checked like any other."""
    log, w, receipts = setup
    w.joined(RUN)
    w.settle(RUN)
    w.record(RUN, log.round(1))  # the join record of session one
    w.evaluated(RUN, 2, MODEL, {})
    w.joined(RUN)  # the join record comes first
    with pytest.raises(Refusal, match="records model"):
        w.record(RUN, log.round(2, model_sha256="bb" * 32))


def test_a_site_that_returns_after_a_redone_round_does_not_dispute_it(setup):
    """It sent an update in (2, 1); the coordinator died and redid round 2 without it, under a new
    attempt (a resumed coordinator never reuses an attempt number it began)."""
    log, w, receipts = setup
    w.joined(RUN)
    w.settle(RUN)
    w.record(RUN, log.round(1))
    took_part(w, 2)
    log.restart()
    w.joined(RUN)  # the join record comes first
    w.record(RUN, log.round(2, attempt=2, participants=[2, 3], selected=[2, 3]))
    assert not w.disputed(RUN)


def test_a_join_record_of_the_attempt_the_site_took_part_in_is_checked_like_any(setup):
    """Red-team finding: the record of (2, 1) leaving out a site that sent its update in (2, 1),
    sent as the first record of a new session, used to pass unchecked."""
    log, w, receipts = setup
    w.joined(RUN)
    w.settle(RUN)
    w.record(RUN, log.round(1))
    took_part(w, 2)
    w.joined(RUN)
    with pytest.raises(Refusal, match="participants"):
        w.record(RUN, log.round(2, participants=[2, 3], selected=[1, 2, 3]))
    assert w.disputed(RUN)


# ---- honest situations that are not lies ------------------------------------------------------------


def test_a_late_evaluation_is_not_a_lie_but_another_epsilon_is(setup):
    log, w, _ = setup
    w.joined(RUN)
    w.settle(RUN)
    w.evaluated(RUN, 1, MODEL, {"epsilon": 1.5})
    w.record(RUN, log.round(1))  # no epsilon credited: the answer came after the deadline
    assert not w.disputed(RUN)
    w.evaluated(RUN, 2, MODEL, {"epsilon": 2.5})
    with pytest.raises(Refusal, match="epsilon 0.5"):
        w.record(RUN, log.round(2, epsilon={"1": 0.5}))


def test_a_run_id_used_twice_is_another_log_not_a_fork(setup, tmp_path):
    log, w, receipts = setup
    kept_round_one(log, w)
    again = Log(tmp_path / "audit-2.jsonl", time=2.0)  # a fresh run under the same id: its records restart at seq 1
    w.joined(RUN)
    w.settle(RUN)
    w.evaluated(RUN, 1, MODEL, {})
    w.record(RUN, again.round(1))
    assert not w.disputed(RUN) and kinds(receipts) == ["round_receipt", "round_receipt"]
    # each log is checked against its own receipts; the other's is named as another log
    [problem] = check(again, receipts).problems
    assert "another log of run" in problem


# ---- lies -------------------------------------------------------------------------------------------


def test_a_record_of_another_attempt_than_the_one_the_site_took_part_in(setup):
    log, w, _ = setup
    w.joined(RUN)
    w.settle(RUN)
    took_part(w, 1, attempt=1)
    with pytest.raises(Refusal, match="attempt 1, in which this site took part, was never aborted"):
        w.record(RUN, log.round(1, attempt=7, selected=[2, 3], participants=[2, 3]))


def test_an_aborted_attempt_is_no_contradiction(setup):
    log, w, _ = setup
    w.joined(RUN)
    w.settle(RUN)
    took_part(w, 1, attempt=1)
    w.aborted(RUN, 1, 1)
    took_part(w, 1, attempt=2)
    w.record(RUN, log.round(1, attempt=2))
    assert not w.disputed(RUN)


def test_a_disputed_run_stays_disputed_and_writes_nothing_more(setup, tmp_path):
    log, w, receipts = setup
    w.joined(RUN)
    w.settle(RUN)
    w.evaluated(RUN, 1, MODEL, {})
    with pytest.raises(Refusal):
        w.record(RUN, log.round(1, model_sha256="bb" * 32))
    for rnd in range(2, 20):  # any number of further records: ignored, the file does not grow
        w.record(RUN, log.round(rnd))
    assert kinds(receipts) == ["round_dispute"]
    restarted = witness(receipts)  # and after the site restarts
    with pytest.raises(Refusal, match="caught lying earlier"):
        restarted.before_fit(RUN, 30, 1)


def test_a_false_sum_is_a_dispute_that_outlives_a_restart(setup):
    """SPEC §6.8: a proof the announced sum fails is kept as a dispute; every later FitIns of the
    run is declined, after a restart too, and a second false sum writes nothing more."""
    log, w, receipts = setup
    w.joined(RUN)
    w.false_sum(RUN, 3, "sum: the survivors' vouches do not add up to the announced sum")
    w.false_sum(RUN, 4, "sum: again")
    assert kinds(receipts) == ["round_dispute"]
    for witness_now in (w, witness(receipts)):
        with pytest.raises(Refusal, match="record: the coordinator was caught lying earlier in this run: round 3"):
            witness_now.before_fit(RUN, 5, 1)


def test_records_of_rounds_the_site_had_no_part_in_are_not_kept(setup):
    log, w, receipts = setup
    w.joined(RUN)
    w.settle(RUN)
    w.record(RUN, log.round(1))  # the join record: kept only if the site had a part
    for rnd in range(2, 10):
        w.record(RUN, log.round(rnd))
    assert not receipts.exists() or kinds(receipts) == []


def test_a_record_nested_deep_is_refused_not_a_crash(setup):
    _, w, receipts = setup
    w.joined(RUN)
    w.settle(RUN)
    with pytest.raises(Refusal, match="nested deeper than 100|not JSON"):
        w.record(RUN, RoundRecord(1, b"[" * 900 + b"]" * 900))
    assert verify_log(receipts, SITE.public, domain=RECEIPT_DOMAIN)[1] is None


# ---- what a hostile site can make the verifier say ---------------------------------------------------


def test_a_genuine_record_filed_under_another_run_or_round_is_only_the_sites_word(setup, tmp_path):
    log, w, receipts = setup
    kept_round_one(log, w)
    other = Log(tmp_path / "audit-b.jsonl", run="b")
    genuine = json.loads(other.round(1).record)
    receipts.unlink()
    SignedLog(receipts, SITE, domain=RECEIPT_DOMAIN).append("round_receipt", run_id=RUN, round=1, site=1,
                                                             evaluated=True, record=genuine)
    [problem] = check(log, receipts).problems
    assert "(the site's word only)" in problem


def test_a_dispute_of_a_record_the_log_holds_is_the_sites_word_against_it(setup):
    log, w, receipts = setup
    honest = json.loads(log.round(1).record)
    SignedLog(receipts, SITE, domain=RECEIPT_DOMAIN).append("round_dispute", run_id=RUN, round=1, site=1,
                                                             problem="made up", record=honest)
    [problem] = check(log, receipts).problems
    assert "as the log holds it: made up (the site's word against the record)" in problem


def test_hostile_receipts_never_crash_the_verifier(setup):
    log, _, receipts = setup
    receipts.write_bytes(b"[" * 5000 + b"]" * 5000 + b"\n")
    [problem] = check(log, receipts).problems
    assert ":1:" in problem


@pytest.mark.parametrize("named", ["the verified one", "another", "none"])
def test_a_record_must_name_the_sum_the_site_verified(setup, named):
    """SPEC §9.3 check 7: the record of an attempt whose sum the site verified names that sum."""
    log, w, receipts = setup
    w.joined(RUN)
    took_part(w, 1, 1, [1, 2, 3])
    verified = bytes(range(32))
    w.verified(RUN, 1, 1, verified)
    fields = {"the verified one": {"sum_blake3": verified.hex()}, "another": {"sum_blake3": "ab" * 32},
              "none": {}}[named]
    if named == "the verified one":
        w.record(RUN, log.round(1, **fields))
        assert kinds(receipts) == ["round_verified", "round_receipt"]
        return
    with pytest.raises(Refusal, match="but this site verified 0001020304050607"):
        w.record(RUN, log.round(1, **fields))
    assert kinds(receipts)[-1] == "round_dispute"
