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

from dataclasses import dataclass
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
    checked = pinned = 0
    for entry in read_log(receipts):
        if entry.get("run_id") != run_id or entry.get("kind") not in ("round_receipt", "round_dispute"):
            continue
        where = f"{receipts}:{entry['seq']}: site {entry.get('site')}'s {entry['kind']} of round {entry.get('round')}"
        record = entry.get("record")
        signed = isinstance(record, dict) and _signed_by(record, coordinator_key)
        if entry["kind"] == "round_dispute":
            proof = ("the coordinator's signed record is attached" if signed else
                     "no record signed by the coordinator attached: the site's word only")
            problems.append(f"{where}: the site refused the record: {entry.get('problem')} ({proof})")
            continue
        if not signed:
            problems.append(f"{where}: its record is not signed by the coordinator's key (the site's claim, no proof)")
            continue
        assert isinstance(record, dict)
        checked += 1
        seq, ours = record["seq"], by_seq.get(record["seq"])
        if ours is None:
            problems.append(f"{where}: the log has no record {seq}, which the coordinator signed and sent this "
                            "site (cut short)")
        elif ours["hash"] != record["hash"]:
            problems.append(f"{where}: the log's record {seq} is not the one the coordinator signed and sent this "
                            f"site (rewritten, or a fork): it records {_gist(ours)}, the site holds {_gist(record)}")
        else:
            pinned = max(pinned, seq)
    if checked == 0 and not problems:
        problems.append(f"{receipts}: no receipt of run {run_id!r}: the site took part in no round of it, or the "
                        "log names another run")
    return ReceiptCheck(checked, problems, pinned)


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
