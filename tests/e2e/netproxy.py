"""A loopback TCP proxy between one site and the coordinator that a test can stall, throttle or cut.

It runs its own anyio event loop in a thread (a blocking portal), so a test drives real site and
coordinator processes through it as a bad network would.  It reads the u32 length prefix of the
frames a site sends (``asagiri/wire/framing.py``), so it can act at the first frame of at least
``big`` bytes (a site's update, or its masked input): hold it back for a while, or until the test
says so (``Plan.hold``: an event, so that a test need not guess how long a stage takes), or pass on
half of it and drop both connections.  It reads the coordinator's frames too: from the first big
one (the model, in a FitIns) it can hold back all the site sends until the test says so
(``Plan.gate``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import anyio.abc
from anyio.from_thread import start_blocking_portal

from asagiri.wire.framing import LENGTH_BYTES


@dataclass
class Plan:
    """What the proxy does. ``rate``: bytes per second each way (None: as fast as it can).
    At the first upstream frame of at least ``big`` bytes: ``stall_s`` seconds of holding every
    byte back (both ways), then, with ``hold``, holding them on until the test sets it; or, with
    ``cut``, half the frame passed on and both connections dropped.  With ``gate``: from the first
    downstream frame of at least ``big`` bytes (a FitIns: the model) every byte the site sends
    waits until the test sets it (the site gets the round, but the round gets nothing from it)."""

    rate: float | None = None
    big: int = 1 << 62
    stall_s: float = 0.0
    hold: threading.Event | None = None
    gate: threading.Event | None = None
    cut: bool = False
    fired: threading.Event = field(default_factory=threading.Event)  # the big frame was seen
    connections: int = 0


async def _until(event: threading.Event | None) -> None:
    """Return once ``event`` (set by the test's thread, not this event loop's) is set; at once if None."""
    while event is not None and not event.is_set():
        await anyio.sleep(0.05)


class _Frames:
    """Frame boundaries of one direction's byte stream: how far into it the next big frame starts."""

    def __init__(self) -> None:
        self.prefix = bytearray()
        self.left = 0  # bytes of the current frame's payload still to come

    def big_frame_at(self, data: bytes, big: int) -> tuple[int, int] | None:
        """(offset in ``data`` where a frame of at least ``big`` bytes begins, its length), or None."""
        pos = 0
        while pos < len(data):
            if self.left:
                step = min(self.left, len(data) - pos)
                self.left -= step
                pos += step
                continue
            start = pos - len(self.prefix)
            take = min(LENGTH_BYTES - len(self.prefix), len(data) - pos)
            self.prefix += data[pos : pos + take]
            pos += take
            if len(self.prefix) == LENGTH_BYTES:
                self.left = int.from_bytes(self.prefix, "big")
                self.prefix.clear()
                if self.left >= big:
                    return max(start, 0), self.left
        return None


class Proxy:
    """Listens on ``port``, forwards each connection to ``upstream_port`` as ``plan`` says."""

    def __init__(self, upstream_port: int, plan: Plan) -> None:
        self.upstream_port = upstream_port
        self.plan = plan
        self.port = 0
        self._stalled: anyio.Event | None = None  # set when a stall ends
        self._gate_armed = False  # the site has been sent its first big frame: its answers wait for the gate

    @contextlib.contextmanager
    def running(self) -> Iterator[Proxy]:
        with start_blocking_portal() as portal:
            listener = portal.call(functools.partial(anyio.create_tcp_listener, local_host="127.0.0.1"))
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            future = portal.start_task_soon(listener.serve, self._connection)
            try:
                yield self
            finally:
                future.cancel()
                portal.call(listener.aclose)

    async def _connection(self, site: anyio.abc.SocketStream) -> None:
        self.plan.connections += 1
        try:
            coordinator = await anyio.connect_tcp("127.0.0.1", self.upstream_port)
        except OSError:
            await site.aclose()
            return
        async with site, coordinator, anyio.create_task_group() as tg:
            tg.start_soon(self._pump, site, coordinator, _Frames(), True, tg.cancel_scope)
            tg.start_soon(self._pump, coordinator, site, _Frames(), False, tg.cancel_scope)

    async def _pump(self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, frames: _Frames, upstream: bool,
                    scope: anyio.CancelScope) -> None:
        plan = self.plan
        try:
            while True:
                data = await src.receive(1 << 16)
                if not upstream and plan.gate is not None and not self._gate_armed:
                    # armed before the model reaches the site: nothing it sends in answer gets through
                    self._gate_armed = frames.big_frame_at(data, plan.big) is not None
                if upstream and self._gate_armed:
                    await _until(plan.gate)
                if upstream and not plan.fired.is_set():
                    hit = frames.big_frame_at(data, plan.big)
                    if hit is not None:
                        plan.fired.set()
                        offset, length = hit
                        if plan.cut:
                            await self._send(dst, data[: offset + LENGTH_BYTES + length // 2])
                            scope.cancel()  # both connections dropped mid-frame
                            return
                        self._stalled = anyio.Event()
                        await anyio.sleep(plan.stall_s)
                        await _until(plan.hold)
                        self._stalled.set()
                if self._stalled is not None:
                    await self._stalled.wait()
                await self._send(dst, data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            scope.cancel()

    async def _send(self, dst: anyio.abc.SocketStream, data: bytes) -> None:
        rate = self.plan.rate
        if rate is None:
            await dst.send(data)
            return
        chunk = max(1, int(rate / 20))  # twenty sends a second
        for i in range(0, len(data), chunk):
            await dst.send(data[i : i + chunk])
            await anyio.sleep(chunk / rate)
