"""The experiment script behind docs/results.md runs and records what the tables quote."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dp_run_on_a_fixed_split_records_track_average_and_sigmas():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "experiments.py"), "--rounds", "2", "--methods", "fedavg",
         "--norm", "group", "--split-seed", "0", "--seeds", "1", "--track", "--ema-also", "0.5",
         "--dp-epsilon", "8", "--clip", "0.1", "--batch-size", "128"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # --split-seed keeps the calibration's split while the training seed changes
    assert (r["seed"], r["split_seed"], r["sizes"]) == (1, 0, [3363, 836, 80, 429])
    assert len(r["round_test_auc"]) == 2 and r["round_test_auc"][-1] == round(r["test_auc"], 4)
    assert set(r["ema_test_auc"]) == {"0.5"} and 0 <= r["ema_test_auc"]["0.5"] <= 1
    # sigma is planned per site, for its own sample rate and step count
    assert len(r["sigmas"]) == 4 and len(set(r["sigmas"])) > 1 and min(r["sigmas"]) > 0
    assert r["groups"] == 32
