"""The audit log read together with the sites' receipts.

The coordinator's ``audit.jsonl`` and each site's ``receipts.jsonl`` are both signed chains
(``signedlog``).  A chain proves that nobody without the key changed it; it cannot stop the key's
holder, the coordinator, from rewriting its own log whole, or cutting it short.  Each site keeps
the coordinator's signed record of every round it was sent (``round_receipt``, ``site/receipts.py``)
after checking it against what it saw.  The log must hold each of those records, byte for byte, at
its place: since a record's hash fixes every record before it, one receipt pins the whole log up
to that record.  A rewrite, a cut or a fork (two signed records with one ``seq``) shows, and the
receipt carries the coordinator's own signature, so no site can make one up.  A site that refused
a record keeps a ``round_dispute`` instead, with the signed record as its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..signedlog import RECEIPT_DOMAIN, line_of, read_log, verify_log, verify_record
from ..wire.crypto import PublicIdentity

__all__ = ["ReceiptCheck", "check_receipts"]


@dataclass(frozen=True)
class ReceiptCheck:
    checked: int  # receipts of this run compared with the log
    problems: list[str]
    pinned: int = 0  # the log is fixed up to this record by the site's receipts
    # the site's word of attempts it contributed to that the log does not record, where a restart of
    # the coordinator explains it (a process that died mid-round lost them too): a reader's question
    notes: list[str] = field(default_factory=list)


def _check_completions(records: list[dict[str, Any]], problems: list[str]) -> None:
    """A round recorded twice is legitimate only when a resumed run redid it: a ``run_started``
    with ``resumed`` between the two."""
    since_resume: set[int] = set()
    for r in records:
        if r.get("kind") == "run_started" and r.get("resumed") is True:
            since_resume = set()
        if r.get("kind") != "round_completed":
            continue
        rnd, model = r.get("round"), r.get("model_sha256")
        if type(rnd) is not int or not isinstance(model, str):
            problems.append(f"log record {r.get('seq')}: a round_completed without an integer round and a model digest")
            continue
        if rnd in since_resume:
            problems.append(f"log record {r.get('seq')}: round {rnd} completed twice with no resume between")
        since_resume.add(rnd)


def check_receipts(audit: Path, receipts: Path, site_key: PublicIdentity, coordinator_key: PublicIdentity, *,
                   run_id: str | None = None) -> ReceiptCheck:
    """Compare one site's receipts with a log whose own chain already verified.  ``run_id``: the
    run the operator means (default: the one the log's first ``run_started`` names); the site
    must hold at least one receipt of it."""
    good, error = verify_log(receipts, site_key, domain=RECEIPT_DOMAIN)
    if error is not None:
        return ReceiptCheck(0, [f"{receipts}:{error.line}: {error.problem}"])
    records = read_log(audit)
    problems: list[str] = []
    if run_id is None:
        run_id = next((r.get("run_id") for r in records if r.get("kind") == "run_started"), None)
        if not isinstance(run_id, str):
            return ReceiptCheck(0, [f"{audit}: no run_started record names the run (cut or rewritten)"])
    if not any(r.get("kind") == "run_started" and r.get("run_id") == run_id for r in records):
        problems.append(f"{audit}: no run_started record for run {run_id!r} (rewritten, or another run's log)")
    _check_completions(records, problems)
    by_seq = {r["seq"]: r for r in records}
    log_id = records[0]["hash"] if records else None
    checked = pinned = 0
    notes: list[str] = []
    for entry in read_log(receipts):
        kind = entry.get("kind")
        if entry.get("run_id") != run_id or kind not in ("round_receipt", "round_dispute", "round_unrecorded"):
            continue
        where = f"{receipts}:{entry['seq']}: site {entry.get('site')}'s {kind} of round {entry.get('round')}"
        if kind == "round_unrecorded" and entry.get("contributed") is True:
            found = _unrecorded_attempt(where, entry, records, by_seq)
            if found is not None:
                (problems if found[0] else notes).append(found[1])
            continue
        if kind == "round_unrecorded":
            problems += _unrecorded(where, entry, records)
            continue
        record = entry.get("record")
        signed = isinstance(record, dict) and _signed_by(record, coordinator_key)
        if signed and not (record.get("kind") == "round_completed" and record.get("run_id") == run_id
                           and record.get("round") == entry.get("round")):
            signed = False  # a genuine record filed under another run or round proves nothing here
        if not signed:
            word = "refused a record" if kind == "round_dispute" else "holds a record"
            problems.append(f"{where}: the site {word} not signed by the coordinator for this run and round "
                            f"(the site's word only){': ' + str(entry.get('problem')) if kind == 'round_dispute' else ''}")
            continue
        assert isinstance(record, dict)
        seq, ours = record["seq"], by_seq.get(record["seq"])
        if record.get("log_id") != log_id:
            problems.append(f"{where}: its signed record is of another log of run {run_id!r} (log id "
                            f"{str(record.get('log_id'))[:16]}..., this log's {str(log_id)[:16]}...): this log was "
                            "rewritten from its first record, or the run id was used twice")
        elif ours is None:
            problems.append(f"{where}: the log has no record {seq}, which the coordinator signed and sent this "
                            "site (cut short)")
        elif ours["hash"] != record["hash"]:
            problems.append(f"{where}: the log's record {seq} is not the one the coordinator signed and sent this "
                            f"site (rewritten, or a fork): it records {_gist(ours)}, the site holds {_gist(record)}")
        elif kind == "round_dispute":
            problems.append(f"{where}: the site refused the coordinator's signed record {seq}, as the log holds it: "
                            f"{entry.get('problem')} (the site's word against the record)")
        else:
            checked += 1
            pinned = max(pinned, seq)
    if checked == 0 and not problems:
        problems.append(f"{receipts}: no receipt of run {run_id!r}: the site took part in no round of it, or the "
                        "log names another run")
    return ReceiptCheck(checked, problems, pinned, notes)


def _unrecorded(where: str, entry: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """A site's own word that it evaluated a model whose record it never got: the log's record of
    that round (up to the record the site saw next) should name that model."""
    rnd, model, seen = entry.get("round"), entry.get("model_sha256"), entry.get("seen_seq")
    out = []
    for r in records:
        if type(seen) is int and r["seq"] > seen:
            break
        if r.get("kind") == "round_completed" and r.get("round") == rnd and r.get("model_sha256") != model:
            out.append(f"{where}: the site says it evaluated model {str(model)[:16]}... and was never sent the record; "
                       f"the log's record {r['seq']} names {str(r.get('model_sha256'))[:16]}... (the site's word; "
                       "a resume before that record means the round was redone)")
    return out


def _unrecorded_attempt(where: str, entry: dict[str, Any], records: list[dict[str, Any]],
                        by_seq: dict[int, dict[str, Any]]) -> tuple[bool, str] | None:
    """A site's own word that it contributed to a round attempt whose record or abort it never got
    before a new session: None if the log holds either.  If not, (True, why) when the log had
    passed that round as the site rejoined (``log_passed``) with no resume that redid it before
    the record the site saw then, or when that record is not the log's: the log should hold it;
    (False, why) otherwise, a note (a coordinator that died mid-round lost it)."""
    rnd, attempt, seen = entry.get("round"), entry.get("attempt"), entry.get("seen_seq")
    shown = entry.get("seen_record")
    if isinstance(shown, dict) and type(seen) is int and by_seq.get(seen, {}).get("hash") != shown.get("hash"):
        return True, (f"{where}: the record that showed this site the log had passed round {rnd} (seq {seen}) is not "
                      "the log's record at that seq: made up, or the log was cut or rewritten")
    if any(r.get("kind") in ("round_completed", "round_aborted") and r.get("round") == rnd
           and r.get("attempt") == attempt for r in records):
        return None
    # a resumed process redoes the rounds from its first_round under new attempts, unrecorded ones
    # lost: a resume counts if it came before the record the site saw on rejoining
    redone = type(rnd) is int and any(r.get("kind") == "run_started" and r.get("resumed") is True
                                      and type(r.get("first_round")) is int and r["first_round"] <= rnd
                                      and (type(seen) is not int or r["seq"] <= seen)
                                      for r in records)
    problem = entry.get("log_passed") is True and not redone
    why = ("the log had passed that round with no resume between: it took the sum without recording it, or was cut"
           if problem else "the coordinator restarted before recording it, or took the sum without recording it")
    return problem, (f"{where}: the site says it contributed to round {rnd} attempt {attempt}; the log holds no "
                     f"record or abort of that attempt ({why})")


def _signed_by(record: dict[str, Any], key: PublicIdentity) -> bool:
    try:
        raw = line_of(record)
    except (TypeError, ValueError):
        return False
    return verify_record(raw, key)[1] is None


def _gist(record: dict[str, Any]) -> str:
    """What a reader compares first: the round, its model and who took part."""
    model = record.get("model_sha256")
    return (f"round {record.get('round')} model {str(model)[:16]}... participants {record.get('participants')} "
            f"(record {str(record.get('hash'))[:16]}...)")
