"""Start a real federation (separate OS processes on loopback) for end-to-end tests."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asagiri.launcher import (
    StatusPipe,
    pinned_site_settings,
    start_coordinator,
    start_site,
    write_federation,
    write_site_config,
)
from asagiri.signedlog import read_log, verify_log
from asagiri.wire.crypto import PublicIdentity

# The deadlines a round's stages get: far past what a first round takes on a busy machine (its
# training and the first masking, which warm up: 16 s at a load average of 8 on two cores), and
# never waited out by a test that does not set its own (a killed site's link closes at once).
# The harness's own bounds (``events``, ``wait_all``) only tell a hang, and are longer still.
# The site policy's floor: the fewest local steps a round may ask for, and enough for these tests.
LOCAL_STEPS = 5
FAST = [
    "data.dataset=synthetic",
    "data.synthetic_samples=256",
    "data.partition.scheme=iid",
    "model.width=8",
    f"train.local_steps={LOCAL_STEPS}",
    "timeouts.heartbeat_interval=1",
    "timeouts.heartbeat_timeout=10",
    "timeouts.fit=120",
    "timeouts.evaluate=120",
    "timeouts.wait_for_sites=60",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A federation without participation batches, whose sites allow that: for the tests of the
# protocol's dropout handling, where a batch rule would take each dropped site's batch with it
# (tests/secagg/test_batches*.py and test_a_killed_site_takes_its_whole_batch_out test the rule).
NO_BATCHES = {"overrides": ["secagg.batch_size=null"], "site_policy": {"require_batches": False}}


class Federation:
    def __init__(self, root: Path, *, sites: int, rounds: int, overrides: list[str] = (),
                 site_policy: dict | None = None, site_settings: dict[int, dict] | None = None,
                 batches: bool = True):
        """``batches=False``: the run cuts no participation batches, and its sites allow that
        (``NO_BATCHES``)."""
        self.root = root
        self.port = free_port()
        if not batches:
            overrides = [*NO_BATCHES["overrides"], *overrides]
            site_policy = {**NO_BATCHES["site_policy"], **(site_policy or {})}
        self.fed_path, self.cfg = write_federation(
            root, sites=sites, rounds=rounds, overrides=[*FAST, f"listen.port={self.port}", *overrides]
        )
        self.pub = (root / "keys" / "coordinator.pub").read_text().strip()
        self.run_dir = Path(self.cfg.run_dir)  # root, unless the overrides name another
        self.coordinator: subprocess.Popen | None = None
        self.sites: dict[int, subprocess.Popen] = {}
        self.site_policy = site_policy or {}
        self.site_settings = site_settings or {}  # per site id: extra keys of its site.yaml
        (root / "logs").mkdir(exist_ok=True)

    def start_coordinator(self, *extra: str) -> subprocess.Popen:
        log = open(self.root / "logs" / "coordinator.log", "ab")
        self.coordinator, self.status, port = start_coordinator(self.fed_path, *extra, stdout=log, stderr=log)
        assert port == self.port
        return self.coordinator

    def site_config(self, site: int, port: int | None = None) -> Path:
        """Write ``site``'s config; ``port``: where it connects (a proxy's), if not to the coordinator."""
        settings = pinned_site_settings(self.cfg, site)
        settings["policy"] = {**settings.get("policy", {}), **self.site_policy}
        settings.update(self.site_settings.get(site, {}))
        return write_site_config(
            self.root, site, port or self.port, self.pub, {"reconnect": {"give_up_s": 60, "max_s": 1}, **settings}
        )

    def start_site(self, site: int, *extra: str, port: int | None = None) -> subprocess.Popen:
        cfg = self.site_config(site, port)
        proc = start_site(cfg, site, *extra, log=open(self.root / "logs" / f"site-{site}.log", "ab"))
        self.sites[site] = proc
        return proc

    def run(self, sites: list[int]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Start the coordinator and ``sites``, run to the end: its status events and every exit code."""
        self.start_coordinator()
        for s in sites:
            self.start_site(s)
        events = self.events()
        return events, self.wait_all()

    def events(self, until: str | None = None, timeout: float = 600) -> list[dict[str, Any]]:
        """The coordinator's status events (``observe.events``) from here on: up to and including the
        first of kind ``until``, or to its exit."""
        status: StatusPipe = self.status
        return status.read(until, timeout)

    def events_until(self, done: Callable[[dict[str, Any]], bool], timeout: float = 600) -> list[dict[str, Any]]:
        """The coordinator's status events from here on, up to and including the first for which
        ``done`` is true, or to its exit."""
        out = []
        deadline = time.monotonic() + timeout
        while (record := self.status.next(max(0.0, deadline - time.monotonic()))) is not None:
            out.append(record)
            if done(record):
                break
        return out

    def wait_for_log(self, site: int, text: str, timeout: float = 600) -> None:
        """Return once ``site``'s log holds ``text`` (what it logs when it reaches a point, an event)."""
        path = self.root / "logs" / f"site-{site}.log"
        deadline = time.monotonic() + timeout
        while text not in (path.read_text() if path.exists() else ""):
            if time.monotonic() > deadline:
                raise TimeoutError(f"site {site} did not log {text!r} within {timeout:.0f}s")
            time.sleep(0.05)

    def wait_all(self, timeout: float = 600) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        codes = {"coordinator": self.coordinator.wait(timeout=timeout)}
        for site, p in self.sites.items():
            codes[f"site-{site}"] = p.wait(timeout=max(1, deadline - time.monotonic()))
        return codes

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []

    def audit(self) -> list[dict]:
        """The audit records, after checking the chain and every signature against the coordinator's key."""
        path = self.run_dir / "audit.jsonl"
        _, error = verify_log(path, PublicIdentity.from_hex(self.pub))
        assert error is None, error
        return read_log(path)

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def kill_all(self) -> None:
        for p in [self.coordinator, *self.sites.values()]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "logs").glob("*.log")))
