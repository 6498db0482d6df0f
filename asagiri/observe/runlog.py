"""The run directory's JSON-lines files, and trimming them back to a checkpoint on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fsutil import append_durably, atomic_write_bytes

__all__ = ["append_jsonl", "trim_jsonl"]


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    append_durably(path, (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode())


def trim_jsonl(path: Path, *, max_round: int) -> int:
    """Drop records of rounds after ``max_round`` (written before a crash, never checkpointed),
    and a last line cut short by a crash or a full disk.  Returns how many records went."""
    if not path.exists():
        return 0
    data = path.read_text()
    lines = [line for line in data.splitlines() if line.strip()]
    kept, dropped = [], 0
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON record; move the file aside to continue") from None
            dropped += 1  # the last write never completed
            continue
        if record.get("round", 0) > max_round:
            dropped += 1
            continue
        kept.append(line)
    if dropped or (data and not data.endswith("\n")):
        atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())
    return dropped
