"""The round-overhead benchmark's short form (``benchmarks/round_overhead.py``): real processes,
secure aggregation on and off; each round's wall time splits into training, evaluation and the
rest, and the parts add up.  The full table is in docs/benchmarks.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_the_overhead_benchmark_splits_each_round():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "round_overhead.py"), "--sites", "3", "--rounds", "2", "--size", "28",
         "--width", "8", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert [(r["secure"], r["round"]) for r in result["rounds"]] == [(True, 1), (True, 2), (False, 1), (False, 2)]
    for r in result["rounds"]:
        assert r["train_s"] > 0 and r["evaluate_s"] > 0 and r["wall_s"] > r["train_s"]
        assert abs(r["train_s"] + r["evaluate_s"] + r["other_s"] - r["wall_s"]) < 1e-2
    assert set(result["mean_after_round_1"]) == {"secure", "plain"}
