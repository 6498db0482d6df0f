"""The newest round a site entered, so that no coordinator can walk it back into an earlier one."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["ReplayGuard"]


class ReplayGuard:
    """The newest (round, attempt) this site entered, per run.  The runtime's subclass persists it
    (``save``), so a restarted site never enters an earlier round again."""

    def __init__(self, marks: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.marks: dict[str, tuple[int, int]] = dict(marks or {})

    def last(self, run_id: str) -> tuple[int, int]:
        return self.marks.get(run_id, (0, 0))

    def advance(self, run_id: str, rnd: int, attempt: int) -> bool:
        """Record (round, attempt) and return True if it is newer than every earlier one."""
        if (rnd, attempt) <= self.last(run_id):
            return False
        self.marks[run_id] = (rnd, attempt)
        self.save()
        return True

    def save(self) -> None:
        """Persist ``marks`` before the round's first message leaves; in memory by default."""
