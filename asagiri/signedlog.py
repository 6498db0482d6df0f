"""A tamper-evident audit log: JSON lines, each carrying the SHA-256 of the previous record.

``record_hash = SHA-256(canonical JSON of the record without "hash")``; each record's
``prev_hash`` is the previous record's ``hash`` (64 zeros for the first).  Editing, deleting or
reordering any record breaks the chain from that point, which :func:`verify_chain` reports.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["AuditError", "AuditLog", "params_digest", "verify_chain"]

GENESIS = "0" * 64


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def params_digest(params: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(params):
        arr = np.require(params[name], requirements="C")
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return h.hexdigest()


@dataclass(frozen=True)
class AuditError:
    line: int
    problem: str


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = GENESIS
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            if lines:
                self._last = json.loads(lines[-1])["hash"]

    def append(self, record: dict[str, Any]) -> str:
        body = dict(record, prev_hash=self._last)
        body["hash"] = hashlib.sha256(_canonical(body)).hexdigest()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(body, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._last = body["hash"]
        return body["hash"]


def verify_chain(path: Path) -> list[AuditError]:
    """Every break in the chain, not just the first."""
    errors: list[AuditError] = []
    prev = GENESIS
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            errors.append(AuditError(i, "not JSON"))
            continue
        claimed = rec.pop("hash", None)
        if rec.get("prev_hash") != prev:
            errors.append(AuditError(i, "prev_hash does not match the previous record"))
        if hashlib.sha256(_canonical(rec)).hexdigest() != claimed:
            errors.append(AuditError(i, "record hash does not match its contents"))
        prev = claimed if isinstance(claimed, str) else prev
    return errors
