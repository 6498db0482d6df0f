"""The coordinator's live console (rich): the round, its stage, every site's state and the latest
metrics, redrawn on each event.  Only on a terminal; elsewhere the recorder's plain lines are the
console (CI, pipes, ``--log-format json``).

The view is a watcher of the driver's events, drawn with ``auto_refresh=False``: it redraws in
the event's own call, so it starts no thread.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .events import (
    Event,
    FederationEnded,
    RoundAborted,
    RoundCompleted,
    RoundStarted,
    SiteDropped,
    SiteJoined,
    SiteRefused,
    StageStarted,
    UpdateReceived,
    as_record,
)
from .recorder import console_line

__all__ = ["LiveView"]

STYLES = {"connected": "cyan", "selected": "yellow", "contributed": "green", "dropped": "red",
          "declined": "magenta", "waiting": "dim"}


class LiveView:
    """Call with each event; ``close`` when the run ends."""

    def __init__(self, sites: list[int], rounds: int, console: Console | None = None) -> None:
        self.rounds = rounds
        self.state: dict[int, str] = dict.fromkeys(sites, "waiting")
        self.round, self.attempt, self.stage = 0, 0, "starting"
        self.latest: dict[str, Any] = {}
        self.live = Live(self._render(), console=console, auto_refresh=False, transient=False, redirect_stdout=False,
                         redirect_stderr=False)
        self.live.start()

    def __call__(self, event: Event) -> None:
        if isinstance(event, SiteJoined):
            self.state[event.site] = "connected"
        elif isinstance(event, RoundStarted):
            self.round, self.attempt, self.stage = event.round, event.attempt, "selection"
            for site in self.state:
                if self.state[site] != "waiting":
                    self.state[site] = "selected" if site in event.selected else "connected"
        elif isinstance(event, StageStarted):
            self.stage = event.stage
        elif isinstance(event, UpdateReceived):
            self.state[event.site] = "contributed"
        elif isinstance(event, SiteDropped):
            self.state[event.site] = "dropped"
        elif isinstance(event, SiteRefused):
            self.state[event.site] = "declined"
        elif isinstance(event, RoundCompleted):
            r = event.record
            self.stage = "done"
            self.latest = {k: r[k] for k in ("auc", "accuracy", "duration_s") if r.get(k) is not None}
            if r.get("epsilon"):
                self.latest["max ε"] = max(r["epsilon"].values())
        elif isinstance(event, RoundAborted):
            self.stage = f"aborted: {event.cause}"
        line = console_line(as_record(event), self.rounds)
        if line is not None:
            self.live.console.print(line)
        self.live.update(self._render(), refresh=True)
        if isinstance(event, FederationEnded):
            self.close()

    def _render(self) -> Group:
        head = Text.assemble(("round ", "bold"), f"{self.round}/{self.rounds}",
                             f" (attempt {self.attempt})" if self.attempt > 1 else "", ("   stage ", "bold"), self.stage)
        table = Table(show_header=True, header_style="bold", box=None)
        table.add_column("site")
        table.add_column("state")
        for site, state in sorted(self.state.items()):
            table.add_row(str(site), Text(state, style=STYLES.get(state, "")))
        figures = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.latest.items())
        return Group(head, table, Text(figures or "no round completed yet", style="dim"))

    def close(self) -> None:
        if self.live.is_started:
            self.live.stop()
