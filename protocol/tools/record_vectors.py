"""Vectors of SPEC §9: a coordinator's signed round record as a site is sent it, the model digest
it names, and records a site must refuse, produced by the package from fixed inputs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from asagiri.params import params_digest
from asagiri.signedlog import AUDIT_DOMAIN, SignedLog, line_of, record_hash, verify_record
from asagiri.wire.crypto import Identity

from .wire_vectors import sample_params, seed

__all__ = ["record_vectors", "sample_record"]

COORDINATOR_SEED = seed(2)  # the coordinator of handshake.json
_UNSIGNED = ("hash", "signer", "sig")


def sample_record() -> tuple[dict[str, Any], bytes]:
    """The third record of a log (so ``prev_hash`` is a real hash): round 2's, with the sample model."""
    coordinator = Identity.from_seed(COORDINATOR_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        log = SignedLog(Path(tmp) / "audit.jsonl", coordinator)
        started = log.append("run_started", run_id="vector-run", first_round=1, resumed=False, time=1.5)
        log.append("site_joined", site=3, fingerprint="00" * 8, time=2.25)
        record = log.append(
            "round_completed", run_id="vector-run", log_id=started["hash"], started=started["seq"], round=2,
            attempt=1, selected=[1, 2, 3], participants=[1, 3],
            dropped=[2], declined={}, survivors=None, model_sha256=params_digest(sample_params()),
            config_sha256="cd" * 32, epsilon={"1": 1.25, "3": 0.0625}, noise_multiplier={"1": 1.1, "3": 1e-05},
            metrics={"auc": 0.875, "accuracy": 0.5}, time=1767225600.125,
        )
    return record, line_of(record)


def _resign(record: dict[str, Any], identity: Identity) -> dict[str, Any]:
    body = {k: v for k, v in record.items() if k not in _UNSIGNED}
    digest = record_hash(body)
    return {**body, "hash": digest, "signer": identity.public.raw.hex(),
            "sig": identity.sign(AUDIT_DOMAIN + bytes.fromhex(digest)).hex()}


def _rejected(record: dict[str, Any]) -> list[dict[str, str]]:
    coordinator, stranger = Identity.from_seed(COORDINATOR_SEED), Identity.from_seed(seed(9))
    edited = {**record, "participants": [1, 2, 3]}
    rehashed = {**edited, "hash": record_hash(edited)}
    cases = [
        ("edited", line_of(edited), "a field changed: the hash no longer matches"),
        ("rehashed", line_of(rehashed), "the hash recomputed: the signature no longer verifies"),
        ("other_key", line_of(_resign(edited, stranger)), "signed by a key other than the pinned coordinator's"),
        ("not_canonical", json.dumps(record, sort_keys=True, indent=1).encode(), "not the record's one written form"),
        ("not_json", line_of(record)[:-1], "cut short: not JSON"),
        ("other_domain", line_of({**_resign(record, coordinator), "sig": coordinator.sign(
            b"asagiri-receipt-v1\x00" + bytes.fromhex(record["hash"])).hex()}), "signed in the receipt domain"),
    ]
    out = []
    for name, line, why in cases:
        assert verify_record(line, coordinator.public)[0] is None, name
        out.append({"name": name, "record_hex": line.hex(), "why": why})
    return out


def record_vectors() -> dict[str, Any]:
    record, line = sample_record()
    assert verify_record(line, Identity.from_seed(COORDINATOR_SEED).public)[0] == record
    hashed = json.dumps({k: v for k, v in record.items() if k not in _UNSIGNED}, sort_keys=True,
                        separators=(",", ":"), allow_nan=False).encode()
    return {
        "coordinator_seed_hex": COORDINATOR_SEED.hex(),
        "model": [{"name": k, "dtype": a.dtype.str, "shape": list(a.shape), "data_hex": a.tobytes().hex()}
                  for k, a in sample_params().items()],
        "model_sha256": record["model_sha256"],
        "record_hex": line.hex(),
        "hashed_hex": hashed.hex(),
        "hash_hex": record["hash"],
        "signed_hex": (AUDIT_DOMAIN + bytes.fromhex(record["hash"])).hex(),
        "sig_hex": record["sig"],
        "rejected": _rejected(record),
    }
