"""The experiment script behind docs/results.md runs federations through the product's code path."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "experiments.py"), *args],
                         capture_output=True, text=True, timeout=600, check=True)
    return [json.loads(line) for line in out.stdout.strip().splitlines()]


def test_a_dp_federation_runs_in_memory_with_secure_aggregation_and_per_site_sigmas():
    [r] = run("--rounds", "1", "--methods", "fedavg", "--model", "scatter_linear", "--optimizer", "sgd",
              "--lr", "0.4", "--split-seed", "0", "--seeds", "1", "--dp-epsilon", "8", "--clip", "0.1",
              "--batch-size", "256")
    assert r["status"] == "completed" and (r["seed"], r["split_seed"]) == (1, 0)
    assert "secagg.enabled=true" in r["config"] and "dp.enabled=true" in r["config"]
    assert r["test_examples"] == 624 and 0.5 < r["test_auc"] <= 1
    # each site plans its own sigma, for its own sample rate, and spends at most its epsilon
    assert len(r["noise_multiplier"]) == 4 and len(set(r["noise_multiplier"].values())) > 1
    assert all(0 < e <= 8.0 * 1.01 for e in r["epsilon"].values())


def test_the_baselines_use_the_same_test_shares():
    central, local = run("--rounds", "1", "--methods", "central", "local", "--model", "scatter_linear",
                         "--optimizer", "sgd", "--lr", "0.01", "--seeds", "0")
    assert central["test_examples"] == local["test_examples"] == 624
    assert central["test_auc"] > 0.9 and central["test_auc"] != local["test_auc"]
