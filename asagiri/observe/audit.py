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

from ..signedlog import read_log, verify_log
from ..wire.crypto import PublicIdentity

__all__ = ["ReceiptCheck", "check_receipts"]


@dataclass(frozen=True)
class ReceiptCheck:
    checked: int  # receipts of this run compared with the log
    problems: list[str]


def check_receipts(audit: Path, receipts: Path, site_key: PublicIdentity) -> ReceiptCheck:
    """Compare one site's receipts with a log whose own chain already verified."""
    good, error = verify_log(receipts, site_key)
    if error is not None:
        return ReceiptCheck(0, [f"{receipts}:{error.line}: {error.problem}"])
    records = read_log(audit)
    run_ids = {r.get("run_id") for r in records if r.get("kind") == "run_started"}
    models: dict[int, set[str]] = {}
    for r in records:
        if r.get("kind") == "round_completed":  # a round redone after a crash is recorded twice
            models.setdefault(r["round"], set()).add(r["model_sha256"])
    checked, problems = 0, []
    for receipt in read_log(receipts):
        if receipt.get("kind") != "round_receipt" or receipt.get("run_id") not in run_ids:
            continue
        checked += 1
        rnd, model = receipt["round"], receipt["model_sha256"]
        where = f"{receipts}:{receipt['seq']}: site {receipt.get('site')}'s receipt for round {rnd}"
        if rnd not in models:
            problems.append(f"{where}: the log has no completed round {rnd} (cut short or rewritten)")
        elif model not in models[rnd]:
            problems.append(f"{where}: the site was sent model {model[:16]}..., the log records "
                            f"{', '.join(m[:16] + '...' for m in sorted(models[rnd]))} (rewritten)")
    return ReceiptCheck(checked, problems)
