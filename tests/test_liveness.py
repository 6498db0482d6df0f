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

import threading
from typing import Any

import anyio
import pytest

import asagiri.client.session as session_module
from asagiri.local import lay_out, run_local
from asagiri.site.worker import SiteWorker

HEARTBEAT_TIMEOUT = 5.0
HELD_FOR = 1.6 * HEARTBEAT_TIMEOUT
FAST = ["data.dataset=synthetic", "data.synthetic_samples=192", "data.partition.scheme=iid", "model.width=8",
        "timeouts.heartbeat_interval=0.5", f"timeouts.heartbeat_timeout={HEARTBEAT_TIMEOUT}",
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
