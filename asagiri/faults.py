"""Fault injection for tests and soak runs: the one hook through which a process kills itself.

A ``FaultPlan`` names points in a run; reaching one ends the process with SIGKILL, as a power
cut or an OOM kill would, with no clean-up.  Both runtimes take a plan (empty by default) and
call :meth:`FaultPlan.reached` at their points; nothing else in the package kills a process.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Literal

__all__ = ["NO_FAULTS", "FaultPlan", "FaultPoint"]

log = logging.getLogger(__name__)

# fit: a site received the round's FitIns; share: a site received the round's shares (it has
# shared its own); round_done: the coordinator recorded the round.
FaultPoint = Literal["fit", "share", "round_done"]


@dataclass(frozen=True)
class FaultPlan:
    kill_at_fit: int | None = None
    kill_after_share: int | None = None
    crash_after_round: int | None = None

    def reached(self, point: FaultPoint, rnd: int) -> None:
        planned = {"fit": self.kill_at_fit, "share": self.kill_after_share, "round_done": self.crash_after_round}
        if planned[point] == rnd:
            log.error("fault injection: killing this process at %s of round %d", point, rnd)
            os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = FaultPlan()
