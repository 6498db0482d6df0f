"""Soak run: many site processes on loopback, many secure rounds, random dropouts and restarts.

    python benchmarks/soak.py                                  # 20 sites, 100 rounds (docs/reliability.md)
    python benchmarks/soak.py --sites 6 --rounds 6 --json      # the short form CI runs

A coordinator process and ``--sites`` site processes (the small CNN at width 4 on synthetic 28 px
images, secure aggregation on, SecAgg+ groups).  At each round's start, each selected site is,
with probability ``--dropout``, marked to die at one stage of that round, drawn at random
(training, key advertisement, sharing, masked input, consistency, unmasking, evaluation): when the
coordinator enters that stage the site process gets SIGKILL, as a power cut would, and is started
again at once (it rejoins when its new process has connected).  Reported, as one JSON object:

- rounds completed and aborted, sites killed and restarted;
- the coordinator's resident memory after each round, and its slope over the run's second half
  (MiB per 100 rounds, a least-squares fit; the first half holds the allocator's warm-up);
- the coordinator's open file descriptors after the first round and after the last (sockets, one
  per connected site and the listeners, apart from the rest);
- round wall-time percentiles (p50, p90, p99, max) from ``metrics.jsonl``;
- every process's exit code (0 expected from all, killed ones aside).

Exits 1 if the run did not complete every round, a process failed, or descriptors leaked.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from asagiri.launcher import (
    pinned_site_settings,
    start_coordinator,
    start_site,
    write_federation,
    write_site_config,
)

STAGES = ["fit", "fit/advertise", "fit/share", "fit/masked_input", "fit/consistency", "fit/unmask", "fit/verify",
          "evaluate"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> dict[str, int]:
    """The process's open descriptors: sockets (one per connected site, the listener) and the rest."""
    links = [str(p.readlink()) for p in Path(f"/proc/{pid}/fd").iterdir() if p.is_symlink()]
    sockets = sum(link.startswith("socket:") for link in links)
    return {"sockets": sockets, "other": len(links) - sockets}


def slope_per_100(values: list[float]) -> float | None:
    """Least-squares slope of ``values`` (one per round) over their second half, per 100 rounds."""
    half = values[len(values) // 2 :]
    if len(half) < 3:
        return None
    x = np.arange(len(half), dtype=float)
    return float(np.polyfit(x, np.asarray(half), 1)[0] * 100)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)}


class Soak:
    def __init__(self, out: Path, *, sites: int, rounds: int, dropout: float, seed: int, samples: int,
                 local_steps: int = 5) -> None:
        self.out = out
        self.rng = random.Random(seed)
        self.dropout = dropout
        self.fed_path, self.cfg = write_federation(out, sites=sites, rounds=rounds, overrides=[
            "data.dataset=synthetic", f"data.synthetic_samples={samples}", "data.partition.scheme=iid",
            "model.width=4", f"train.local_steps={local_steps}", f"min_clients={max(3, sites // 2)}",
            "max_round_attempts=10",
            "timeouts.heartbeat_interval=2", "timeouts.heartbeat_timeout=20", "timeouts.fit=120",
            "timeouts.secagg_stage=60", "timeouts.evaluate=60", "timeouts.wait_for_sites=120",
        ])
        (out / "logs").mkdir(exist_ok=True)
        self.pub = (out / "keys" / "coordinator.pub").read_text().strip()
        self.site_ids = list(range(1, sites + 1))
        self.procs: dict[int, subprocess.Popen] = {}
        self.exits: list[tuple[int, int]] = []  # (site, exit code) of every process that ended unasked
        self.killed = 0

    def start_site(self, site: int, port: int) -> None:
        settings = pinned_site_settings(self.cfg, site)
        cfg = write_site_config(self.out, site, port, self.pub,
                                {"reconnect": {"give_up_s": 300, "max_s": 1, "initial_s": 0.2}, **settings})
        self.procs[site] = start_site(cfg, site, log=open(self.out / "logs" / f"site-{site}.log", "ab"))

    def kill(self, site: int, port: int, *, restart: bool) -> None:
        proc = self.procs[site]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            self.killed += 1
        else:
            self.exits.append((site, proc.returncode))
        if restart:
            self.start_site(site, port)
        else:
            del self.procs[site]

    def run(self) -> dict[str, Any]:
        log = open(self.out / "logs" / "coordinator.log", "ab")
        t0 = time.monotonic()
        coordinator, status, port = start_coordinator(self.fed_path, stdout=log, stderr=log)
        for s in self.site_ids:
            self.start_site(s, port)
        doomed: dict[str, list[int]] = {}
        rss: list[float] = []
        fds_start = fds_end = None
        completed = aborted = 0
        while (event := status.next(timeout=600)) is not None:
            kind = event["event"]
            if kind == "RoundStarted":
                doomed = {}
                for s in event["selected"]:
                    if self.rng.random() < self.dropout:
                        doomed.setdefault(self.rng.choice(STAGES), []).append(s)
            elif kind == "StageStarted":
                for s in doomed.pop(event["stage"], []):
                    self.kill(s, port, restart=True)
            elif kind in ("RoundCompleted", "RoundAborted"):
                # a killed site is restarted in the last round too: with participation batches (the
                # default) a round needs its batch back, whole, for its next attempt
                for sites in doomed.values():  # their stage never came (the round ended first)
                    for s in sites:
                        self.kill(s, port, restart=True)
                doomed = {}
                completed += kind == "RoundCompleted"
                aborted += kind == "RoundAborted"
                if kind == "RoundCompleted":
                    rss.append(rss_mib(coordinator.pid))
                    fds_end = open_fds(coordinator.pid)
                    fds_start = fds_start or fds_end
        code = coordinator.wait(timeout=120)
        # A site restarted just before the end may connect only after the coordinator left: it
        # never hears that the run is over and keeps trying; it is stopped here, and counted.
        deadline = time.monotonic() + 30
        site_codes, missed_the_end = {}, []
        for s, p in self.procs.items():
            try:
                site_codes[s] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait()
                missed_the_end.append(s)
        wall = time.monotonic() - t0
        metrics = [json.loads(x) for x in (self.out / "metrics.jsonl").read_text().splitlines()]
        return {
            "sites": len(self.site_ids),
            "rounds_planned": self.cfg.rounds,
            "rounds_completed": completed,
            "round_attempts_aborted": aborted,
            "dropout": self.dropout,
            "sites_killed": self.killed,
            "mean_participants": round(float(np.mean([len(m["participants"]) for m in metrics])), 2),
            "coordinator_exit": code,
            "site_exits": sorted(set(site_codes.values())) or [0],
            "unasked_exits": self.exits,
            "restarted_too_late_to_hear_the_end": missed_the_end,
            "rss_mib_first": round(rss[0], 1) if rss else None,
            "rss_mib_last": round(rss[-1], 1) if rss else None,
            "rss_mib_max": round(max(rss), 1) if rss else None,
            "rss_slope_mib_per_100_rounds": None if (s := slope_per_100(rss)) is None else round(s, 2),
            "fds_first_round": fds_start,
            "fds_last_round": fds_end,
            "round_s": percentiles([m["duration_s"] for m in metrics]),
            "wall_s": round(wall, 1),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=20)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--dropout", type=float, default=0.2, help="chance that a selected site dies in a round")
    p.add_argument("--samples", type=int, default=4000, help="synthetic training images in all")
    p.add_argument("--local-steps", type=int, default=5,
                   help="local steps a round (5, the site policy's floor: about one pass over 200 images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="asagiri-soak-") as tmp:
        out = args.out or Path(tmp)
        soak = Soak(out, sites=args.sites, rounds=args.rounds, dropout=args.dropout, seed=args.seed,
                    samples=args.samples, local_steps=args.local_steps)
        try:
            result = soak.run()
        finally:
            for proc in soak.procs.values():
                if proc.poll() is None:
                    proc.kill()
    print(json.dumps(result, indent=None if args.json else 2))
    ok = (result["rounds_completed"] == result["rounds_planned"] and result["coordinator_exit"] == 0
          and result["site_exits"] == [0] and not result["unasked_exits"]
          and result["fds_last_round"]["other"] <= result["fds_first_round"]["other"]
          and result["fds_last_round"]["sockets"] <= result["sites"] + 3)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
