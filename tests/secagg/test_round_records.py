"""A coordinator running modified code lies in its signed record of a round (protocol/SPEC.md §9),
against three real ``asagiri-client`` processes on loopback.

Each case runs one honest secure-aggregation round with sites 1-3, has site 1 evaluate a global
model, and sends site 1 a record of the round.  The honest record is kept as a receipt, and the
receipt exposes a later rewrite of the coordinator's log; every lie is refused: site 1 keeps the
signed record as evidence (``round_dispute``) and declines every later round of that run for good.
The site's view is computed independently here: the digest of the model the attacker sent, the
survivor list the sites signed, and what site 1 reported in its EvaluateRes.
"""

from __future__ import annotations

import itertools

import pytest

from asagiri.causes import AbortCause
from asagiri.observe.audit import check_receipts
from asagiri.params import params_digest
from asagiri.signedlog import SignedLog, line_of, read_log
from asagiri.wire.crypto import Identity
from asagiri.wire.messages import EvaluateIns, EvaluateRes, RoundAborted, RoundRecord

from .malicious import Attacker, Round, rule_of

pytestmark = pytest.mark.e2e

DEMO = [1, 2, 3]
_runs = itertools.count(1)


@pytest.fixture(scope="module")
def attacker(tmp_path_factory):
    with Attacker.running(tmp_path_factory.mktemp("records"), DEMO) as a:
        yield a


class Coordinator:
    """The attacker's own audit log (its real key), from which it signs the records it sends."""

    def __init__(self, attacker: Attacker, run: str) -> None:
        self.run = run
        self.path = attacker.root / f"audit-{run}.jsonl"
        self.log = SignedLog(self.path, attacker.identity)
        self.log.append("run_started", run_id=run, first_round=1, resumed=False)

    def honest(self, rnd: Round, model: dict) -> dict:
        """The record an honest coordinator writes of ``rnd``, evaluated on ``model``."""
        return {"run_id": self.run, "log_id": self.log.first_hash, "started": 1,
                "round": rnd.fit.round, "attempt": rnd.fit.attempt, "selected": DEMO,
                "participants": DEMO, "dropped": [], "declined": {}, "model_sha256": params_digest(model),
                "epsilon": {}, "noise_multiplier": {}, "sum_blake3": rnd.result.sum_digest.hex()}

    def sign(self, fields: dict, *, kind: str = "round_completed") -> dict:
        return self.log.append(kind, **fields)


async def evaluated_round(attacker: Attacker, sessions) -> tuple[Round, dict, EvaluateRes]:
    """One honest secure round, then site 1 evaluates the new global model (the attacker's choice).
    Sites 2 and 3 are bystanders: they are told the attempt aborted, since a site that sent an
    update takes no later round until it holds that attempt's record or abort."""
    rnd = Round(attacker, sessions, DEMO)
    await rnd.honest()
    for bystander in (2, 3):
        await rnd.send(bystander, RoundAborted(rnd.fit.round, rnd.fit.attempt, AbortCause.TOO_FEW_SITES, "test"))
    model = {k: v * 0.5 for k, v in rnd.fit.params.items()}
    await rnd.send(1, EvaluateIns(rnd.fit.round, model, "val"))
    res = await sessions[1].expect(60)
    assert isinstance(res, EvaluateRes)
    return rnd, model, res


async def next_round(attacker: Attacker, sessions, sites=DEMO) -> Round:
    rnd = Round(attacker, sessions, sites)
    await rnd.start()
    return rnd


def body(record: dict) -> dict:
    """A record's fields, for signing it again (in a rewritten or forked log)."""
    return {k: v for k, v in record.items() if k not in ("seq", "prev_hash", "hash", "signer", "sig")}


def receipts(attacker: Attacker, site: int = 1):
    return attacker.root / f"site-{site}" / "receipts.jsonl"


def site_key(attacker: Attacker, site: int = 1):
    return attacker.site_keys[site].public


def test_control_the_honest_record_is_kept_and_pins_the_coordinators_log(attacker):
    run = f"record-{next(_runs)}"

    async def script(sessions):
        coordinator = Coordinator(attacker, run)
        rnd, model, _ = await evaluated_round(attacker, sessions)
        record = coordinator.sign(coordinator.honest(rnd, model))
        await rnd.send(1, RoundRecord(rnd.fit.round, line_of(record)))
        later = await next_round(attacker, sessions)  # the site trains on: no refusal
        return coordinator, record, later

    coordinator, record, later = attacker.case(script, sites=DEMO, run=run)
    assert later.declines == {} and sorted(later.keys) == DEMO
    [kept] = [r for r in read_log(receipts(attacker)) if r.get("run_id") == run and r["kind"] == "round_receipt"]
    assert kept["kind"] == "round_receipt" and kept["evaluated"] is True and kept["record"] == record
    check = check_receipts(coordinator.path, receipts(attacker), site_key(attacker), attacker.identity.public,
                           run_id=run)
    assert (check.checked, check.problems, check.pinned) == (1, [], record["seq"])

    # The coordinator rewrites its log afterwards (re-signed, so its own chain still verifies):
    # the site's receipt holds the coordinator's signature on what it said at the time.
    original = read_log(coordinator.path)
    coordinator.path.unlink()
    rewritten = SignedLog(coordinator.path, attacker.identity)
    for r in original:
        fields = body(r)
        if r["kind"] == "round_completed":
            fields["participants"] = [2, 3]  # site 1 was never in it
        rewritten.append(**fields)
    [problem] = check_receipts(coordinator.path, receipts(attacker), site_key(attacker), attacker.identity.public,
                               run_id=run).problems
    assert "is not the one the coordinator signed and sent this site" in problem and "[1, 2, 3]" in problem


LIES = {
    # the log names another model than the one the site was sent
    "model": lambda fields: {**fields, "model_sha256": "ab" * 32},
    # site 1's masked input was summed, yet the record leaves it out
    "participants": lambda fields: {**fields, "participants": [2, 3], "dropped": [1]},
    # privacy the site never reported (its policy keeps report_privacy off)
    "epsilon": lambda fields: {**fields, "epsilon": {"1": 0.5}},
    # another run's record
    "run": lambda fields: {**fields, "run_id": "another-run"},
    # another sum than the one the sites verified (SPEC §6.8, §9.3 check 7)
    "sum": lambda fields: {**fields, "sum_blake3": "cd" * 32},
}


@pytest.mark.parametrize("lie", [*LIES, "forged", "fork"])
def test_a_false_record_is_refused_and_kept_as_evidence(attacker, lie):
    run = f"record-{next(_runs)}"

    async def script(sessions):
        coordinator = Coordinator(attacker, run)
        rnd, model, _ = await evaluated_round(attacker, sessions)
        honest = coordinator.honest(rnd, model)
        if lie == "forged":  # a record not signed by the key the site pinned
            other = SignedLog(attacker.root / f"other-{run}.jsonl", Identity.generate())
            record = other.append("round_completed", **honest)
        elif lie == "fork":  # the site keeps one record; then another, signed, with the same seq
            first = coordinator.sign(honest)
            await rnd.send(1, RoundRecord(rnd.fit.round, line_of(first)))
            fork = SignedLog(attacker.root / f"fork-{run}.jsonl", attacker.identity)
            for r in read_log(coordinator.path)[:-1]:
                fork.append(**body(r))
            # a difference the site cannot check on its own: only the fork gives it away
            record = fork.append("round_completed", **{**honest, "metrics": {"auc": 0.99}})
            assert record["seq"] == first["seq"] and record["hash"] != first["hash"]
        else:
            record = coordinator.sign(LIES[lie](honest))
        await rnd.send(1, RoundRecord(rnd.fit.round, line_of(record)))
        later = await next_round(attacker, sessions)
        again = await next_round(attacker, sessions)
        return record, later, again

    record, later, again = attacker.case(script, sites=DEMO, run=run)
    # site 1 declines every later round of the run, naming the rule only; the others go on
    assert rule_of(later.declines[1]) == "record" and 1 not in later.keys and sorted(later.keys) == [2, 3]
    assert rule_of(again.declines[1]) == "record"
    [dispute] = [r for r in read_log(receipts(attacker)) if r.get("run_id") == run and r["kind"] == "round_dispute"]
    if lie == "forged":
        assert dispute["record"] is None and "does not verify under the pinned coordinator key" in dispute["problem"]
    else:
        assert dispute["record"] == record  # the coordinator's own signature, as evidence
    if lie == "fork":
        assert "(a fork)" in dispute["problem"]
    coordinator_log = attacker.root / f"audit-{run}.jsonl"
    problems = check_receipts(coordinator_log, receipts(attacker), site_key(attacker), attacker.identity.public,
                              run_id=run).problems
    # What the verifier can say: a fork is proof in the coordinator's own signatures; a lie the
    # log holds is the site's word against the signed record; an unsigned record, the site's word.
    expected = {"fork": "(rewritten, or a fork)", "forged": "(the site's word only)", "run": "(the site's word only)"}
    said = expected.get(lie, "as the log holds it")
    assert any(said in p for p in problems), problems
    assert "record" in attacker.log(1)


def test_a_withheld_record_stops_the_site_until_it_comes(attacker):
    run = f"record-{next(_runs)}"

    async def script(sessions):
        coordinator = Coordinator(attacker, run)
        rnd, model, _ = await evaluated_round(attacker, sessions)
        skipped = await next_round(attacker, sessions)  # no record of the evaluated round
        record = coordinator.sign(coordinator.honest(rnd, model))
        await rnd.send(1, RoundRecord(rnd.fit.round, line_of(record)))
        resumed = await next_round(attacker, sessions)
        return skipped, resumed

    skipped, resumed = attacker.case(script, sites=DEMO, run=run)
    assert rule_of(skipped.declines[1]) == "record" and sorted(skipped.keys) == [2, 3]
    assert resumed.declines == {} and sorted(resumed.keys) == DEMO


def test_a_record_message_never_crashes_the_site(attacker):
    """Bytes that are not a record at all: refused, never a crash.  The first is JSON nested 500
    deep (deep nesting once killed the site process); after a dispute the site ignores the run's
    records."""
    run = f"record-{next(_runs)}"
    junk = [b"[" * 500 + b"]" * 500, b"", b"\xff" * 100, b"[1, 2]", b'{"kind": "round_completed"}', b"[" * 100000]

    async def script(sessions):
        for data in junk:
            await sessions[2].conn.send(RoundRecord(1, data))
        return await next_round(attacker, sessions)

    later = attacker.case(script, sites=DEMO, run=run)
    assert rule_of(later.declines[2]) == "record" and sorted(later.keys) == [1, 3]
    assert attacker.procs[2].poll() is None
    [dispute] = [r for r in read_log(receipts(attacker, 2)) if r.get("run_id") == run and r["kind"] == "round_dispute"]
    assert dispute["kind"] == "round_dispute" and dispute["record"] is None
    assert "nested deeper than 100" in dispute["problem"]


def test_a_round_without_its_record_stops_every_site_that_sent_an_update(attacker):
    """Issue 26, attack 5: the coordinator sums a round, asks no site to evaluate it and never
    sends its record, so no receipt would hold it. Every site that sent a masked input declines
    the next round (rule ``record``) until the record comes, and then goes on."""
    run = f"record-{next(_runs)}"

    async def script(sessions):
        coordinator = Coordinator(attacker, run)
        rnd = Round(attacker, sessions, DEMO)
        await rnd.honest()  # every site's masked input summed; no EvaluateIns, no RoundRecord
        withheld = await next_round(attacker, sessions)
        record = coordinator.sign(coordinator.honest(rnd, rnd.fit.params))
        for site in DEMO:
            await rnd.send(site, RoundRecord(rnd.fit.round, line_of(record)))
        resumed = await next_round(attacker, sessions)
        return withheld, resumed

    withheld, resumed = attacker.case(script, sites=DEMO, run=run)
    assert {s: rule_of(r) for s, r in withheld.declines.items()} == {s: "record" for s in DEMO}
    assert withheld.keys == {}  # not one key advertised: nothing of the next round began
    assert resumed.declines == {} and sorted(resumed.keys) == DEMO  # the control: with the record, on they go


def test_reconnecting_instead_of_sending_records_is_excused_only_max_unrecorded_times(attacker):
    """The red-team's bypass of attack 5: a coordinator that sums a round and then opens a new
    session instead of sending the record.  A new session can be an honest restart, so the site
    excuses it, keeping its own signed word of the attempt (``round_unrecorded``), but only
    ``policy.max_unrecorded`` (2) times in a run: the fourth round is declined by every site."""
    run = f"record-{next(_runs)}"

    async def summed_without_record(sessions):
        await Round(attacker, sessions, DEMO).honest()

    async def ask(sessions):
        return await next_round(attacker, sessions)

    for _ in range(3):
        attacker.case(summed_without_record, sites=DEMO, run=run)
    refused = attacker.case(ask, sites=DEMO, run=run)
    assert {s: rule_of(r) for s, r in refused.declines.items()} == {s: "record" for s in DEMO}
    assert refused.keys == {}
    for site in DEMO:
        owed = [r for r in read_log(receipts(attacker, site)) if r.get("run_id") == run
                and r["kind"] == "round_unrecorded"]
        assert len(owed) == 3 and all(r["contributed"] for r in owed)
