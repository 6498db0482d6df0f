"""What a site keeps on disk so that a restart cannot be used against it."""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_write_bytes
from ..secagg.replay import ReplayGuard

__all__ = ["PersistentReplayGuard", "StateError"]


class StateError(Exception):
    """The site's state directory holds something it cannot trust; it will not start over it."""


class PersistentReplayGuard(ReplayGuard):
    """The last (round, attempt) entered per run, in ``state_dir/secagg_rounds.json``, written
    atomically before the round's key advertisement leaves the site."""

    def __init__(self, path: Path) -> None:
        self.path = path
        marks: dict[str, tuple[int, int]] = {}
        if path.exists():
            try:
                raw = json.loads(path.read_text())
                for run_id, (rnd, attempt) in raw.items():
                    if type(rnd) is not int or type(attempt) is not int or not isinstance(run_id, str):
                        raise ValueError("entries are run_id: [round, attempt]")
                    marks[run_id] = (rnd, attempt)
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                raise StateError(
                    f"{path}: unreadable replay guard ({exc}); it records which rounds this site has entered, "
                    "so the site will not start without it. Restore it, or delete it only if no coordinator "
                    "could replay earlier rounds to this site"
                ) from None
        super().__init__(marks)

    def save(self) -> None:
        data = {run_id: list(mark) for run_id, mark in sorted(self.marks.items())}
        atomic_write_bytes(self.path, (json.dumps(data, indent=1) + "\n").encode())
