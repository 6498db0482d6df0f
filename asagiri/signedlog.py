"""A signed, hash-chained log of JSON lines: the coordinator's audit log (one record per round
and per notable event) and each site's receipts of the rounds it took part in.

Each record carries ``seq`` (its line number, from 1) and ``prev_hash`` (the previous record's
``hash``; 64 zeros for the first).  ``hash = SHA-256(canonical JSON of the record without hash,
signer and sig)``, and ``sig`` is the coordinator's Ed25519 signature over ``DOMAIN || hash``,
made with its identity key.  Canonical JSON: keys sorted, no spaces, no NaN.

What :func:`verify_log` catches, given the coordinator's public key:
- an edited record: its hash no longer matches its contents;
- an edit with the hash recomputed: the signature no longer verifies;
- a record deleted, inserted or moved: ``seq`` and ``prev_hash`` no longer follow;
- a record re-signed with another key: the signature does not verify under the given key.

A chain cannot show that records were cut off its end, nor stop the key's holder from rewriting
it whole: the sites' receipts do (``observe/audit.py``), since each site signs, in its own log,
the digest of every global model it was sent for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .wire.crypto import AuthenticationFailed, Identity, PublicIdentity

__all__ = ["DOMAIN", "GENESIS", "LogError", "SignedLog", "read_log", "record_hash", "verify_log"]

GENESIS = "0" * 64
DOMAIN = b"asagiri-audit-v1\x00"
_UNHASHED = ("hash", "signer", "sig")


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k not in _UNHASHED})).hexdigest()


@dataclass(frozen=True)
class LogError:
    line: int
    problem: str


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records, for a reader that trusts the file (verify it first)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class SignedLog:
    """Appends records signed by ``identity`` to ``path``, continuing the chain already there."""

    def __init__(self, path: Path, identity: Identity) -> None:
        self.path = path
        self.identity = identity
        self._last, self._seq = GENESIS, 0
        if path.exists():
            records = read_log(path)
            if records:
                if "seq" not in records[-1] or "sig" not in records[-1]:
                    raise ValueError(f"{path}: an unsigned log (written by an older Asagiri); start a new one")
                self._last, self._seq = records[-1]["hash"], int(records[-1]["seq"])

    def append(self, kind: str, **fields: Any) -> str:
        """Write one record; returns its hash."""
        body: dict[str, Any] = {"kind": kind, **fields, "seq": self._seq + 1, "prev_hash": self._last}
        digest = record_hash(body)
        body.update(hash=digest, signer=self.identity.public.raw.hex(),
                    sig=self.identity.sign(DOMAIN + bytes.fromhex(digest)).hex())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(body, sort_keys=True, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._last, self._seq = digest, self._seq + 1
        return digest


def _check(rec: Any, *, seq: int, prev: str, key: PublicIdentity) -> str | None:
    """Why record number ``seq`` is bad, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    missing = [k for k in ("seq", "prev_hash", "hash", "sig", "kind") if k not in rec]
    if missing:
        return f"missing {', '.join(missing)}"
    if rec["seq"] != seq:
        return (f"seq is {rec['seq']!r}, expected {seq}: a record before it was deleted or inserted, or it was moved")
    if rec["prev_hash"] != prev:
        return "prev_hash is not the previous record's hash: a record before it was replaced, inserted or moved"
    try:
        digest = record_hash(rec)
    except (TypeError, ValueError):
        return "contents cannot be hashed"
    if rec["hash"] != digest:
        return "hash does not match the contents: the record was edited"
    try:
        key.verify(DOMAIN + bytes.fromhex(digest), bytes.fromhex(str(rec["sig"])))
    except (AuthenticationFailed, ValueError):
        return "signature does not verify under the given key: re-signed by another key, or rehashed"
    return None


def verify_log(path: Path, key: PublicIdentity) -> tuple[int, LogError | None]:
    """Check the whole chain: (records read, the first bad record or None).  Checking stops at
    the first bad record, since nothing after it can be trusted to link correctly."""
    prev, seq = GENESIS, 0
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            return seq, LogError(line_no, "empty line")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            return seq, LogError(line_no, "not JSON")
        problem = _check(rec, seq=seq + 1, prev=prev, key=key)
        if problem is not None:
            return seq, LogError(line_no, problem)
        prev, seq = rec["hash"], seq + 1
    return seq, None
