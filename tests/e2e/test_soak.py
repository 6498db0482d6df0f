"""The soak benchmark's short form (``benchmarks/soak.py``): 5 site processes, 3 secure rounds,
20% of the selected sites killed at a random stage each round and restarted.  The full run
(20 sites, 100 rounds) and its figures are in docs/reliability.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_the_short_soak_completes_every_round_and_leaks_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--sites", "5", "--rounds", "3", "--samples", "500",
         "--seed", "1", "--out", str(tmp_path / "soak"), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert proc.returncode == 0, result
    assert result["rounds_completed"] == 3 and result["coordinator_exit"] == 0
    assert result["sites_killed"] > 0  # the faults happened
    assert result["site_exits"] == [0] and not result["unasked_exits"]
    assert result["fds_last_round"]["other"] <= result["fds_first_round"]["other"]
    assert result["rss_mib_last"] - result["rss_mib_first"] < 50, result
    assert set(result["round_s"]) == {"p50", "p90", "p99", "max"}
