"""What a site keeps on disk so that a restart cannot be used against it."""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_write_bytes
from ..policy import JoinedRun, JoinedRuns
from ..secagg.replay import ReplayGuard

__all__ = ["PersistentJoinedRuns", "PersistentReplayGuard", "StateError"]


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


class PersistentJoinedRuns(JoinedRuns):
    """The spec digest and site layout each run was joined with, in ``state_dir/run_specs.json``,
    written atomically when a run is first accepted, before the site acts on it: a coordinator
    cannot change a run's spec by making the site restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        runs: dict[str, JoinedRun] = {}
        if path.exists():
            try:
                raw = json.loads(path.read_text())
                if not isinstance(raw, dict):
                    raise ValueError("not a mapping of run_id to its joined spec")
                for run_id, entry in raw.items():
                    spec, num_sites, site_index = entry["spec"], entry["num_sites"], entry["site_index"]
                    if (not isinstance(spec, str) or len(spec) != 64 or set(spec) - set("0123456789abcdef")
                            or any(v is not None and type(v) is not int for v in (num_sites, site_index))
                            or set(entry) != {"spec", "num_sites", "site_index"}):
                        raise ValueError("entries are run_id: {spec: hex digest, num_sites, site_index}")
                    runs[run_id] = JoinedRun(spec, num_sites, site_index)
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                raise StateError(
                    f"{path}: unreadable record of joined runs ({exc}); it fixes each run's spec, so the "
                    "site will not start without it. Restore it, or delete it only if no coordinator could "
                    "change the spec of a run this site has joined"
                ) from None
        super().__init__(runs)

    def save(self) -> None:
        data = {run_id: {"spec": j.spec, "num_sites": j.num_sites, "site_index": j.site_index}
                for run_id, j in sorted(self.runs.items())}
        atomic_write_bytes(self.path, (json.dumps(data, indent=1) + "\n").encode())
