"""Sites catching up on the rounds they missed (protocol/SPEC.md §6.9), beside the round loop.

A site sends ``ModelAt`` with the round of the model it holds; the coordinator answers with the
kept sum of every recorded round after it (``SumRecord``), in order, for the site to check and
step through itself.  One answer per session, one catch-up per site at a time, each sent from a
background task so that a slow or silent site holds up only its own.  A round's verified sum also
goes, once the round is kept, to the connected sites that were not in it.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from ..observe.sums import SumHistory
from ..wire.messages import ModelAt
from .round import Outbound, RoundOutcome
from .sessions import Sessions

__all__ = ["CatchUp"]

log = logging.getLogger(__name__)


class CatchUp:
    def __init__(self, sessions: Sessions, sums: SumHistory) -> None:
        self.sessions = sessions
        self.sums = sums
        self.answered: dict[int, int] = {}  # site -> the session whose ModelAt was answered
        self.sending: dict[int, anyio.CancelScope] = {}  # site -> its catch-up in progress (one at a time)
        self.background: anyio.abc.TaskGroup | None = None  # where catch-ups are sent from, while a run runs

    async def answer(self, site_id: int, msg: ModelAt) -> None:
        """Send the sums of every recorded round after ``msg.round``.  A site cannot have the
        history sent over and over by asking again in one session."""
        session = self.sessions.session_number(site_id)
        if self.answered.get(site_id) == session:
            log.warning("site %d asked for the sums it missed twice in one session; ignored", site_id)
            return
        self.answered[site_id] = session
        if (earlier := self.sending.pop(site_id, None)) is not None:
            earlier.cancel()  # the site's previous session's catch-up: that session is gone
        if self.background is not None:  # a slow or silent site holds up its own catch-up only
            self.background.start_soon(self._send_history, site_id, session, msg.round)
        else:
            await self._send_history(site_id, session, msg.round)

    async def _send_history(self, site_id: int, session: int, after: int) -> None:
        sent = 0
        with anyio.CancelScope() as scope:
            self.sending[site_id] = scope
            try:
                for record in self.sums.after(after):
                    if self.sessions.session_number(site_id) != session or site_id not in self.sessions.connected():
                        return
                    await self.sessions.send([Outbound(site_id, record)])
                    sent += 1
            finally:
                if self.sending.get(site_id) is scope:
                    del self.sending[site_id]
        if sent:
            log.info("site %d holds the model after round %d: sent it the sums of %d later rounds", site_id, after,
                     sent)

    async def send_sum_record(self, outcome: RoundOutcome) -> None:
        """The round's verified sum, to the connected sites that neither vouched for it nor were
        sent it to evaluate the new model: they derive the model from it."""
        rec = outcome.sum_record
        if rec is None:
            return
        others = sorted(self.sessions.connected() - set(outcome.participants) - set(outcome.sum_sent))
        await self.sessions.send([Outbound(s, rec) for s in others])
