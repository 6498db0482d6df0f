"""The audit log read together with the sites' receipts.

The coordinator's ``audit.jsonl`` and each site's ``receipts.jsonl`` are both signed chains
(``signedlog``).  A chain proves that nobody without the key changed it; it cannot stop the key's
holder, the coordinator, from rewriting its own log whole, or cutting it short.  Each site signs
a receipt of every global model it is sent for evaluation (``round_receipt``: run id, round,
model digest), so any one site's receipts show such a rewrite: the log must hold a completed
round with that model for every round the site has a receipt of.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..signedlog import RECEIPT_DOMAIN, read_log, verify_log
from ..wire.crypto import PublicIdentity

__all__ = ["ReceiptCheck", "check_receipts"]


@dataclass(frozen=True)
class ReceiptCheck:
    checked: int  # receipts of this run compared with the log
    problems: list[str]


def _completions(records: list[dict[str, Any]], problems: list[str]) -> dict[int, set[str]]:
    """Each round's recorded models.  A round recorded twice is legitimate only when a resumed
    run redid it: a ``run_started`` with ``resumed`` between the two."""
    models: dict[int, set[str]] = {}
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
        models.setdefault(rnd, set()).add(model)
    return models


def check_receipts(audit: Path, receipts: Path, site_key: PublicIdentity, *,
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
    models = _completions(records, problems)
    checked = 0
    for receipt in read_log(receipts):
        if receipt.get("kind") != "round_receipt" or receipt.get("run_id") != run_id:
            continue
        checked += 1
        rnd, model = receipt.get("round"), receipt.get("model_sha256")
        where = f"{receipts}:{receipt['seq']}: site {receipt.get('site')}'s receipt for round {rnd}"
        if type(rnd) is not int or not isinstance(model, str):
            problems.append(f"{where}: malformed (no integer round and model digest)")
        elif rnd not in models:
            problems.append(f"{where}: the log has no completed round {rnd} (cut short or rewritten)")
        elif model not in models[rnd]:
            problems.append(f"{where}: the site was sent model {model[:16]}..., the log records "
                            f"{', '.join(m[:16] + '...' for m in sorted(models[rnd]))} (rewritten)")
    if checked == 0:
        problems.append(f"{receipts}: no receipt of run {run_id!r}: the site took part in no round of it, or the "
                        "log names another run")
    return ReceiptCheck(checked, problems)
