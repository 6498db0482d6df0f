"""Fault injection for tests and soak runs: the one hook through which a process kills itself.

A ``FaultPlan`` names one point of one round; reaching it ends the process with SIGKILL, as a
power cut or an OOM kill would, with no clean-up.  Both runtimes take a plan (empty by default)
and call :meth:`FaultPlan.reached` at their points; nothing else in the package kills a process.
The command lines take it as ``POINT:ROUND`` (``asagiri-client --kill-at masked:2``,
``asagiri-coordinator --crash-at fit/unmask:2``), hidden from their help.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

__all__ = ["COORDINATOR_POINTS", "NO_FAULTS", "SITE_POINTS", "FaultPlan"]

log = logging.getLogger(__name__)

# A site: fit, its FitIns arrived; keys, its SecAggStart arrived (before it advertises keys); share,
# the shares sent to it arrived (it has shared its own); masked, it sent its masked input; unmask,
# the UnmaskRequest arrived (before it answers); vouch, the announced sum arrived (before it vouches).
SITE_POINTS = ("fit", "keys", "share", "masked", "unmask", "vouch")
# The coordinator: the stage a round attempt enters (the driver's stage names; "fit" alone when
# secure aggregation is off), or round_done, the round recorded and checkpointed.
COORDINATOR_POINTS = ("fit", "fit/advertise", "fit/share", "fit/masked_input", "fit/consistency", "fit/unmask",
                      "fit/verify", "evaluate", "round_done")


@dataclass(frozen=True)
class FaultPlan:
    point: str | None = None
    round: int | None = None

    @classmethod
    def parse(cls, spec: str | None, points: tuple[str, ...]) -> FaultPlan:
        """``POINT:ROUND`` (or None: no fault)."""
        if spec is None:
            return NO_FAULTS
        point, _, rnd = spec.rpartition(":")
        if point not in points or not rnd.isdigit() or int(rnd) < 1:
            raise ValueError(f"fault {spec!r}: expected POINT:ROUND with POINT one of {', '.join(points)}")
        return cls(point, int(rnd))

    def reached(self, point: str, rnd: int) -> None:
        if (point, rnd) == (self.point, self.round):
            log.error("fault injection: killing this process at %s of round %d", point, rnd)
            os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = FaultPlan()
