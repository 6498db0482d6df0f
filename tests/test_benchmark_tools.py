"""The small tools behind docs/results.md's grid: the cohort sub-sampler and the table maker."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str, *args: str) -> str:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=300, check=True).stdout


def test_subsample_keeps_each_class_in_proportion_and_the_test_split_whole(tmp_path):
    rng = np.random.default_rng(0)
    labels = {"train": rng.integers(0, 3, (900, 1)), "val": rng.integers(0, 3, (200, 1)), "test": rng.integers(0, 3, (300, 1))}
    np.savez(tmp_path / "src.npz", **{f"{s}_labels": y for s, y in labels.items()},
             **{f"{s}_images": rng.integers(0, 255, (len(y), 28, 28), dtype=np.uint8) for s, y in labels.items()})
    tool("subsample.py", str(tmp_path / "src.npz"), "--train", "90", "--out", str(tmp_path / "small.npz"))
    with np.load(tmp_path / "small.npz") as f:
        assert (len(f["train_labels"]), len(f["val_labels"]), len(f["test_labels"])) == (90, 12, 300)
        share = np.bincount(f["train_labels"].ravel(), minlength=3) / 90
        np.testing.assert_allclose(share, np.bincount(labels["train"].ravel(), minlength=3) / 900, atol=0.02)
    tool("subsample.py", str(tmp_path / "src.npz"), "--train", "90", "--binary", "2", "--out", str(tmp_path / "b.npz"))
    with np.load(tmp_path / "b.npz") as f:
        assert set(np.unique(f["test_labels"])) == {0, 1}
        assert f["test_labels"].sum() == (labels["test"] == 2).sum()


def test_grid_table_gives_mean_and_sd_over_seeds_and_per_site_rows(tmp_path):
    rows = [{"method": m, "dataset": "d", "path": None, "scheme": "iid", "seed": s, "status": "completed",
             "test_auc": auc, "test_site_auc": {"1": auc, "2": auc - 0.1}}
            for m, s, auc in [("fedavg", 0, 0.8), ("fedavg", 1, 0.9), ("scaffold", 0, 0.85)]]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    table = tool("grid_table.py", str(tmp_path / "g.jsonl"))
    assert "| fedavg | 0.850 ± 0.071 |" in table and "| scaffold | 0.850 ± 0.000 (n=1) |" in table
    per_site = tool("grid_table.py", str(tmp_path / "g.jsonl"), "--per-site")
    assert "| 0 | 2 | 0.700 | 0.750 |" in per_site and "| 1 | 1 | 0.900 | – |" in per_site
