"""A signed, hash-chained log of JSON lines: the coordinator's audit log (one record per round
and per notable event) and each site's receipts of the rounds it took part in.

Each record carries ``seq`` (its line number, from 1) and ``prev_hash`` (the previous record's
``hash``; 64 zeros for the first).  ``hash = SHA-256(canonical JSON of the record without hash,
signer and sig)`` (keys sorted, no spaces, no NaN), and ``sig`` is the writer's Ed25519 signature
over ``domain || hash``, made with its identity key: ``AUDIT_DOMAIN`` for the coordinator's log,
``RECEIPT_DOMAIN`` for a site's receipts.  Each line must be exactly the form the writer gives it
(``json.dumps(record, sort_keys=True)``), so no record has a second spelling.

What :func:`verify_log` catches, given the writer's public key:
- an edited record: its hash no longer matches its contents;
- an edit with the hash recomputed: the signature no longer verifies;
- a record deleted, inserted or moved: ``seq`` and ``prev_hash`` no longer follow;
- a record re-signed with another key: the signature does not verify under the given key.

A chain cannot show that records were cut off its end, nor stop the key's holder from rewriting
it whole: the sites' receipts do (``observe/audit.py``).  The coordinator sends each site its
signed record of every round (``RoundRecord``); the site checks it against what it saw and keeps
it in its own signed receipts.  A record's hash fixes every record before it, so one receipt
pins the coordinator's whole log up to that record.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .fsutil import append_durably, atomic_write_bytes
from .wire.crypto import AuthenticationFailed, Identity, PublicIdentity

__all__ = ["AUDIT_DOMAIN", "GENESIS", "RECEIPT_DOMAIN", "LogError", "SignedLog", "line_of", "read_log",
           "record_hash", "verify_log", "verify_record"]

GENESIS = "0" * 64
# One signing domain per log, so a record of one can never stand for a record of the other.
AUDIT_DOMAIN = b"asagiri-audit-v1\x00"
RECEIPT_DOMAIN = b"asagiri-receipt-v1\x00"
MAX_LINE_BYTES = 1 << 20
MAX_DEPTH = 100  # objects and lists nested deeper are refused (protocol/SPEC.md §9.3)
_UNHASHED = ("hash", "signer", "sig")

log = logging.getLogger(__name__)


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
    """Appends records signed by ``identity`` to ``path`` under ``domain``, continuing the chain
    already there, which it verifies first.  A last line cut short by a crash (no newline: its
    write never completed) is dropped; any other damage is an error, never silently repaired."""

    def __init__(self, path: Path, identity: Identity, *, domain: bytes = AUDIT_DOMAIN) -> None:
        self.path = path
        self.identity = identity
        self.domain = domain
        self._last, self._seq = GENESIS, 0
        self.first_hash: str | None = None  # the log's identity: its first record's hash
        if not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            log.warning("%s: dropping a last record cut short by a crash (%d bytes)", path, len(data) - len(keep))
            atomic_write_bytes(path, keep)
        chain = _walk(path, identity.public, domain)
        if chain.error is not None:
            raise ValueError(f"{path}:{chain.error.line}: {chain.error.problem}; move the file aside to start a new log")
        self._seq, self._last, self.first_hash = chain.records, chain.last, chain.first

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Write one record; returns it as written (``hash`` and ``sig`` included)."""
        body: dict[str, Any] = {"kind": kind, **fields, "seq": self._seq + 1, "prev_hash": self._last}
        digest = record_hash(body)
        body.update(hash=digest, signer=self.identity.public.raw.hex(),
                    sig=self.identity.sign(self.domain + bytes.fromhex(digest)).hex())
        append_durably(self.path, (_line(body) + "\n").encode())
        self._last, self._seq = digest, self._seq + 1
        if self.first_hash is None:
            self.first_hash = digest
        return body


def _line(record: dict[str, Any]) -> str:
    """How a record is written: the one byte form a verifier accepts (so no duplicate keys, and
    no second spelling of the same record)."""
    return json.dumps(record, sort_keys=True, allow_nan=False)


def _is_hex(value: Any, size: int) -> bool:
    return isinstance(value, str) and len(value) == 2 * size and all(c in "0123456789abcdef" for c in value)


def _check(rec: Any, line: str, *, seq: int, prev: str, key: PublicIdentity, domain: bytes) -> str | None:
    """Why record number ``seq`` of a chain is bad, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    missing = [k for k in ("seq", "prev_hash", "hash", "sig", "kind") if k not in rec]
    if missing:
        return f"missing {', '.join(missing)}"
    if type(rec["seq"]) is not int or rec["seq"] != seq:
        return f"seq is {rec['seq']!r}, expected {seq}: a record before it was deleted or inserted, or it was moved"
    if rec["prev_hash"] != prev:
        return "prev_hash is not the previous record's hash: a record before it was replaced, inserted or moved"
    return _check_signed(rec, line, key=key, domain=domain)


def _check_signed(rec: dict[str, Any], line: str, *, key: PublicIdentity, domain: bytes) -> str | None:
    """Why one record's own hash, form or signature is bad, or None (its place in a chain aside)."""
    try:
        digest = record_hash(rec)
        canonical = _line(rec)
    except (TypeError, ValueError, RecursionError):
        return "contents cannot be hashed"
    if rec.get("hash") != digest:
        return "hash does not match the contents: the record was edited"
    if line != canonical:
        return "not in the canonical form (keys sorted, each once): the record was edited"
    if rec.get("signer") != key.raw.hex():
        return "signer is not the given key (signed by another key)"
    if not _is_hex(rec.get("sig"), 64):
        return "signature is not 64 bytes of hex"
    try:
        key.verify(domain + bytes.fromhex(digest), bytes.fromhex(rec["sig"]))
    except AuthenticationFailed:
        return "signature does not verify under the given key: re-signed by another key, or rehashed"
    return None


def verify_record(raw: bytes, key: PublicIdentity, *, domain: bytes = AUDIT_DOMAIN) -> tuple[dict[str, Any] | None, str | None]:
    """One record on its own, as a line of its log (a site checking the record the coordinator
    sends it): (the record, None) if it is well formed and signed by ``key``, else (None, why).
    Never raises."""
    rec, problem = _parse(raw)
    if problem is not None:
        return None, problem
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    missing = [k for k in ("seq", "prev_hash", "hash", "sig", "kind") if k not in rec]
    if missing:
        return None, f"missing {', '.join(missing)}"
    if type(rec["seq"]) is not int or rec["seq"] < 1 or not _is_hex(rec["prev_hash"], 32) or \
            not isinstance(rec["kind"], str):
        return None, "kind, seq or prev_hash malformed"
    problem = _check_signed(rec, raw.decode("utf-8"), key=key, domain=domain)
    return (None, problem) if problem is not None else (rec, None)


def line_of(record: dict[str, Any]) -> bytes:
    """A record's one written form, as ``verify_record`` takes it."""
    return _line(record).encode()


def _parse(raw: bytes) -> tuple[Any, str | None]:
    """One line's record, or why it cannot be read (never raises)."""
    if len(raw) > MAX_LINE_BYTES:
        return None, f"longer than {MAX_LINE_BYTES} bytes"
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except (ValueError, RecursionError):  # JSONDecodeError, an integer past Python's digit limit, deep nesting
        return None, "not JSON"
    if _depth(rec) > MAX_DEPTH:
        return None, f"nested deeper than {MAX_DEPTH}"
    return rec, None


def _depth(value: Any, limit: int = MAX_DEPTH + 1) -> int:
    """How deep lists and objects nest (0 for a scalar), counted up to ``limit``."""
    if limit == 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def verify_log(path: Path, key: PublicIdentity, *, domain: bytes = AUDIT_DOMAIN) -> tuple[int, LogError | None]:
    """Check the whole chain: (records read, the first bad record or None).  Checking stops at
    the first bad record, since nothing after it can be trusted to link correctly."""
    chain = _walk(path, key, domain)
    return chain.records, chain.error


class _Chain(NamedTuple):
    records: int  # records that verified
    first: str | None  # the first one's hash: the log's identity
    last: str  # the last one's hash (GENESIS if none)
    error: LogError | None  # the first bad record


def _walk(path: Path, key: PublicIdentity, domain: bytes) -> _Chain:
    """One pass over the chain, stopping at the first bad record."""
    prev, seq, first = GENESIS, 0, None
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            raw = raw.rstrip(b"\n")
            if not raw.strip():
                return _Chain(seq, first, prev, LogError(line_no, "empty line"))
            rec, problem = _parse(raw)
            if problem is None:
                problem = _check(rec, raw.decode("utf-8"), seq=seq + 1, prev=prev, key=key, domain=domain)
            if problem is not None:
                return _Chain(seq, first, prev, LogError(line_no, problem))
            prev, seq = rec["hash"], seq + 1
            first = first or prev
    return _Chain(seq, first, prev, None)
