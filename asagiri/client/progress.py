"""A progress bar of the site's local training, on a terminal only (elsewhere the site's log says
``round N: trained on E examples in S s``).

Training runs in a worker thread; each step is counted there, and only a change of the shown
percentage crosses to the event loop (``anyio.from_thread``), which draws. No thread draws, and
none is started for drawing.
"""

from __future__ import annotations

import anyio.from_thread
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..train.loop import OnStep

__all__ = ["TrainingProgress"]


class TrainingProgress:
    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console or Console(stderr=True), auto_refresh=False,
                                 transient=True)

    def round(self, rnd: int, total: int) -> OnStep:
        """Start round ``rnd``'s bar (``total`` expected steps); returns the training thread's
        per-step callback."""
        task = self.progress.add_task(f"round {rnd}: local training", total=max(total, 1))
        self.progress.start()
        shown = -1

        def on_step(done: int) -> None:  # in the training thread
            nonlocal shown
            percent = min(100, 100 * done // max(total, 1))
            if percent != shown:
                shown = percent
                anyio.from_thread.run_sync(self._draw, task, done)

        return on_step

    def _draw(self, task: int, done: int) -> None:
        self.progress.update(task, completed=done)
        self.progress.refresh()

    def finish(self) -> None:
        for task in list(self.progress.task_ids):
            self.progress.remove_task(task)
        self.progress.stop()
