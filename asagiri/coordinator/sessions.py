"""The coordinator's site sessions: who is connected, heartbeats, reading, sending, dropping.

Whatever carries a session (an authenticated TCP channel, or an in-memory pair in one process)
is served the same way by :meth:`Sessions.serve`, and the federation driver talks to sites only
through this registry: it sends :class:`Outbound` messages and receives ``(site, message)`` or
``(site, SiteLost)`` events from one bounded stream, so the driver is the only task that touches
round state.  Anything a site can cause (a malformed or out-of-stage message, silence past the
heartbeat timeout, a reset) ends that site's session and reaches the driver as ``SiteLost``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..config import TimeoutsConfig
from ..observe.metrics import CoordinatorMetrics
from ..wire.errors import ConnectionLost, RemoteProtocolError
from ..wire.messages import FitRes, Heartbeat, MaskedInput, Message, Shutdown
from ..wire.pool import ArrayPool
from .round import Outbound, SiteLost

__all__ = ["SessionConnection", "Sessions"]

log = logging.getLogger(__name__)

SiteEvent = tuple[int, Message | SiteLost]


class SessionConnection(Protocol):
    """What a session needs of its channel (``wire.connection.Connection``, ``wire.memory``)."""

    bytes_sent: int
    bytes_received: int

    @property
    def pool(self) -> ArrayPool: ...

    async def send(self, msg: Message) -> None: ...

    async def receive(self) -> Message: ...


@dataclass
class _Session:
    site_id: int
    conn: SessionConnection
    scope: anyio.CancelScope


class Sessions:
    def __init__(self, timeouts: TimeoutsConfig, metrics: CoordinatorMetrics, *, capacity: int) -> None:
        self.timeouts = timeouts
        self.metrics = metrics
        self._sessions: dict[int, _Session] = {}
        self._opened: dict[int, int] = {}  # sessions each site has opened in this process
        self._changed = anyio.Event()
        send, recv = anyio.create_memory_object_stream[SiteEvent](max(64, capacity))
        self._events_in: MemoryObjectSendStream[SiteEvent] = send
        self._events: MemoryObjectReceiveStream[SiteEvent] = recv

    # -- who is here ------------------------------------------------------------------------------

    def connected(self) -> set[int]:
        return set(self._sessions)

    def session_number(self, site_id: int) -> int:
        """How many sessions ``site_id`` has opened (its current one's number)."""
        return self._opened.get(site_id, 0)

    async def changed(self) -> None:
        """Return once a site has joined or left."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        self.metrics.connected_sites.set(len(self._sessions))

    # -- serving one site -------------------------------------------------------------------------

    async def serve(self, site_id: int, conn: SessionConnection) -> None:
        """Run one site's session until it ends (its Welcome already sent). A newer session of the
        same site replaces this one."""
        old = self._sessions.get(site_id)
        if old is not None:
            log.info("site %d reconnected; closing its previous session", site_id)
            old.scope.cancel()
        with anyio.CancelScope() as scope:
            session = _Session(site_id, conn, scope)
            self._sessions[site_id] = session
            self._opened[site_id] = self._opened.get(site_id, 0) + 1
            self._notify()
            log.info("site %d joined", site_id)
            reason = "closed"
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._heartbeat, conn)
                    reason = await self._read_loop(site_id, conn)
                    tg.cancel_scope.cancel()
            finally:
                if self._sessions.get(site_id) is session:
                    del self._sessions[site_id]
                    self._notify()
                    self.metrics.bytes_received.inc(conn.bytes_received)
                    self.metrics.bytes_sent.inc(conn.bytes_sent)
                    with anyio.CancelScope(shield=True):
                        await self._events_in.send((site_id, SiteLost(reason)))
        if scope.cancelled_caught:
            log.info("site %d session closed by the coordinator", site_id)

    async def _heartbeat(self, conn: SessionConnection) -> None:
        seq = 0
        while True:
            await anyio.sleep(self.timeouts.heartbeat_interval)
            seq += 1
            try:
                await conn.send(Heartbeat(seq))
            except ConnectionLost:
                return

    async def _read_loop(self, site_id: int, conn: SessionConnection) -> str:
        while True:
            try:
                with anyio.fail_after(self.timeouts.heartbeat_timeout):
                    msg = await conn.receive()
            except TimeoutError:
                log.warning("site %d: silent for %.0fs, dropping it", site_id, self.timeouts.heartbeat_timeout)
                return "heartbeat timeout"
            except RemoteProtocolError as exc:
                self.metrics.protocol_violations.labels("session").inc()
                log.warning("site %d: protocol violation, closing its channel: %s", site_id, exc)
                return f"protocol violation: {exc}"
            except ConnectionLost:
                log.info("site %d disconnected", site_id)
                return "disconnected"
            if isinstance(msg, Heartbeat):
                continue
            await self._events_in.send((site_id, msg))

    # -- what the driver uses ---------------------------------------------------------------------

    async def receive(self) -> SiteEvent:
        return await self._events.receive()

    def receive_nowait(self) -> SiteEvent | None:
        try:
            return self._events.receive_nowait()
        except anyio.WouldBlock:
            return None

    async def send(self, outbound: list[Outbound]) -> None:
        """Send to every site at once, and to each site in order (its FitIns before its SecAggStart)."""
        if not outbound:
            return
        per_site: dict[int, list[Message]] = {}
        for out in outbound:
            per_site.setdefault(out.site, []).append(out.msg)
        async with anyio.create_task_group() as tg:
            for site, msgs in per_site.items():
                session = self._sessions.get(site)
                if session is not None:
                    tg.start_soon(self._send_or_drop, session, msgs)

    async def _send_or_drop(self, session: _Session, msgs: list[Message]) -> None:
        with anyio.move_on_after(self.timeouts.fit) as scope:
            try:
                for msg in msgs:
                    await session.conn.send(msg)
                return
            except ConnectionLost:
                pass
        if scope.cancelled_caught:
            log.warning("site %d: send timed out, dropping it", session.site_id)
        session.scope.cancel()

    def drop(self, site_id: int) -> None:
        session = self._sessions.get(site_id)
        if session is not None:
            session.scope.cancel()

    def release(self, site_id: int, msg: Message) -> None:
        """The round copied the update into its running sum: its buffers can take the next one."""
        session = self._sessions.get(site_id)
        if session is not None and isinstance(msg, FitRes):
            session.conn.pool.release(msg.update.values())
        elif session is not None and isinstance(msg, MaskedInput):
            session.conn.pool.release(msg.vector.values())

    async def shutdown(self, reason: str) -> None:
        """Tell every site the federation is over; "stopped" (a signal) is not final: sites keep
        reconnecting for a --resume."""
        msg = Shutdown(f"federation {reason}", reason != "stopped")
        with anyio.move_on_after(self.timeouts.shutdown, shield=True):
            async with anyio.create_task_group() as tg:
                for session in list(self._sessions.values()):
                    tg.start_soon(self._send_quietly, session.conn, msg)

    @staticmethod
    async def _send_quietly(conn: SessionConnection, msg: Message) -> None:
        try:
            await conn.send(msg)
        except ConnectionLost:
            pass
