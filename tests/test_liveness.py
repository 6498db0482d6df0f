"""A busy site is alive; a dead one is not.

The site's session answers heartbeats from its first moment, whatever its training thread is
doing: setting up its data and model, or training, for longer than the coordinator's
``heartbeat_timeout``.  Only a round's deadline may decide that a site is too slow.  These run
in one process (``asagiri.local``) with the site's worker thread held on an event: the test
releases it only after more than a heartbeat timeout has passed, so the site cannot be kept by a
fast machine, and the heartbeats come from the event loop, which the held thread does not use.
(A stopped process, which sends nothing, is dropped: ``tests/e2e/test_faults.py``.)
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import anyio
import pytest

import asagiri.client.session as session_module
from asagiri.client.runtime import Site
from asagiri.local import lay_out, run_local
from asagiri.site.worker import SiteWorker

HEARTBEAT_TIMEOUT = 5.0
HELD_FOR = 1.6 * HEARTBEAT_TIMEOUT
FAST = ["data.dataset=synthetic", "data.synthetic_samples=192", "data.partition.scheme=iid", "model.width=8",
        "train.local_steps=5", "timeouts.heartbeat_interval=0.5", f"timeouts.heartbeat_timeout={HEARTBEAT_TIMEOUT}",
        # only the heartbeat may drop a site here: the round deadlines are far away
        "timeouts.fit=600", "timeouts.evaluate=600", "timeouts.secagg_stage=600", "timeouts.wait_for_sites=600"]


class HeldWorker(SiteWorker):
    """Site 1's worker, whose set-up or training waits for the test's release."""

    release: threading.Event
    held: threading.Event
    at: str

    def __init__(self, cfg: Any, *args: Any) -> None:
        self.site_id = cfg.site_id
        if self.site_id == 1 and self.at == "setup":
            self._hold()
        super().__init__(cfg, *args)

    def train(self, *args: Any) -> Any:
        if self.site_id == 1 and self.at == "train":
            self._hold()
        return super().train(*args)

    def _hold(self) -> None:
        self.held.set()
        self.release.wait()


@pytest.mark.parametrize("at", ["setup", "train"])
def test_a_site_whose_worker_is_busy_past_the_heartbeat_timeout_is_not_dropped(tmp_path, monkeypatch, at):
    held, release = threading.Event(), threading.Event()
    monkeypatch.setattr(HeldWorker, "held", held, raising=False)
    monkeypatch.setattr(HeldWorker, "release", release, raising=False)
    monkeypatch.setattr(HeldWorker, "at", at, raising=False)
    monkeypatch.setattr(session_module, "SiteWorker", HeldWorker)
    cfg, sites = lay_out(tmp_path, sites=3, rounds=2, overrides=FAST)
    seen: list[Any] = []

    result: dict[str, Any] = {}

    async def main() -> None:
        dropped = anyio.Event()

        def watch(event: Any) -> None:
            seen.append(event)
            if type(event).__name__ == "SiteDropped":
                dropped.set()  # the test has failed: stop at once rather than wait for the rounds

        async with anyio.create_task_group() as tg:
            async def let_go() -> None:
                try:
                    while not held.is_set():  # the worker thread reached the hold
                        await anyio.sleep(0.05)
                    await anyio.sleep(HELD_FOR)
                finally:
                    release.set()

            async def stop_on_drop() -> None:
                await dropped.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(let_go)
            tg.start_soon(stop_on_drop)
            result.update(await run_local(cfg, sites, watchers=[watch]))
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        release.set()
    summary = result
    assert held.is_set()
    dropped = [e for e in seen if type(e).__name__ == "SiteDropped"]
    assert dropped == [], dropped
    completed = [e.record for e in seen if type(e).__name__ == "RoundCompleted"]
    assert summary["status"] == "completed" and [r["participants"] for r in completed] == [[1, 2, 3]] * 2
    # the hold really outlasted the coordinator's patience for silence
    assert completed[0]["duration_s"] >= HEARTBEAT_TIMEOUT or at == "setup"


def test_fitins_sent_while_the_site_sets_up_do_not_pile_up_in_its_memory(tmp_path, monkeypatch):
    """A red-team finding: each FitIns that arrived during set-up held its tensors until its
    training task woke after set-up, so a coordinator could fill a site's memory with models.
    With site 1's set-up held, a scripted coordinator (the real key and wire) sends five FitIns
    of newer and newer rounds: the four superseded ones give their tensors back at once."""
    from asagiri.config import RunSpec
    from asagiri.initial import initial_params
    from asagiri.wire.connection import accept_handshake
    from asagiri.wire.crypto import Identity, PublicIdentity
    from asagiri.wire.memory import memory_stream_pair
    from asagiri.wire.messages import FitIns, Heartbeat, Welcome
    from asagiri.wire.pool import ArrayPool

    held, release = threading.Event(), threading.Event()
    monkeypatch.setattr(HeldWorker, "held", held, raising=False)
    monkeypatch.setattr(HeldWorker, "release", release, raising=False)
    monkeypatch.setattr(HeldWorker, "at", "setup", raising=False)
    monkeypatch.setattr(session_module, "SiteWorker", HeldWorker)
    cfg, sites = lay_out(tmp_path, sites=3, rounds=5, overrides=FAST)
    coordinator = Identity.load(tmp_path / "keys" / "coordinator.key")
    roster = {s.id: PublicIdentity.from_hex(s.public_key) for s in cfg.sites}
    params = initial_params(cfg)
    returned: list[int] = []  # one entry per FitIns whose tensors went back to the pool
    four_back = anyio.Event()
    keep = ArrayPool.release

    def counting(pool: ArrayPool, arrays: Any) -> None:
        arrays = list(arrays)
        if len(arrays) == len(params):  # one FitIns's tensors
            returned.append(len(returned) + 1)
            if len(returned) == 4:
                four_back.set()
        keep(pool, arrays)

    monkeypatch.setattr(ArrayPool, "release", counting)

    async def main() -> None:
        near, far = memory_stream_pair()
        async with anyio.create_task_group() as tg:
            tg.start_soon(Site(sites[1]).session, far)
            _, conn = await accept_handshake(near, coordinator, roster, max_frame_size=cfg.max_frame_bytes,
                                             max_payload_bytes=cfg.max_message_bytes, chunk_bytes=cfg.chunk_bytes)
            await conn.send(Welcome(cfg.run_id, 0, 3, RunSpec.of(cfg).wire()))

            async def heartbeats() -> None:  # as the coordinator sends them: the site stays in session
                for seq in itertools.count(1):
                    await conn.send(Heartbeat(seq))
                    await anyio.sleep(0.5)

            tg.start_soon(heartbeats)
            await anyio.to_thread.run_sync(held.wait)
            for rnd in range(1, 6):
                await conn.send(FitIns(rnd, 1, params, {"mu": 0.0}))
            try:
                with anyio.fail_after(30):
                    await four_back.wait()
                # all four while set-up was still held, and the newest still waits to be trained
                assert len(returned) == 4 and held.is_set() and not release.is_set()
            finally:
                release.set()  # the set-up thread cannot be cancelled: let it end
                tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        release.set()
