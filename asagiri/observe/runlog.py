"""The run directory's JSON-lines files, and trimming them back to a checkpoint on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write_bytes

__all__ = ["append_jsonl", "trim_jsonl"]


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def trim_jsonl(path: Path, *, max_round: int) -> int:
    """Drop records of rounds after ``max_round`` (written before a crash, never checkpointed)."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if json.loads(line).get("round", 0) > max_round:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())
    return dropped
