"""The training-throughput benchmark's short form (``benchmarks/train_throughput.py``): it runs,
and both sides train at a sane rate.  Its full table, on CPU, is in docs/benchmarks.md."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_throughput_benchmark_measures_both_sides_of_each_configuration():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--models", "small_cnn", "scatter_linear",
         "--sizes", "28", "--images", "128", "--repeat", "1", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["model"], r["dp"]) for r in rows] == [("small_cnn", False), ("small_cnn", True),
                                                      ("scatter_linear", False), ("scatter_linear", True)], out.stderr
    for r in rows:
        assert r["ours_images_s"] > 0 and r["bare_images_s"] > 0
        # a gross slow-down of the site's path would show here; the 0.9 goal is checked on the full run
        assert r["ratio"] > 0.5, r


def test_the_benchmark_carries_the_speed_settings_to_both_sides():
    """What a GPU run uses (mixed precision, channels-last, ghost clipping), forced on the CPU so
    the bare loop's copy of them is exercised here too."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--models", "small_cnn", "--sizes", "28",
         "--images", "64", "--repeat", "1", "--precision", "bf16", "--channels-last", "on", "--dp-clipping", "ghost",
         "--json"],
        capture_output=True, text=True, timeout=600,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["dp"], r["accel"]) for r in rows] == [
        (False, "bfloat16 autocast, channels-last"), (True, "float32, ghost clipping")], out.stderr
    assert all(r["ours_images_s"] > 0 and r["bare_images_s"] > 0 for r in rows)


def test_the_reference_estimate_reads_the_measured_rates(tmp_path):
    rows = [{"model": "resnet18", "size": 224, "dp": False, "device": "cpu", "accel": "float32",
             "ours_images_s": 10.0, "eval_images_s": 40.0},
            {"model": "resnet18", "size": 224, "dp": True, "device": "cpu", "accel": "float32",
             "ours_images_s": 2.5},
            {"model": "small_cnn", "size": 224, "dp": False, "device": "cpu", "accel": "float32",
             "ours_images_s": 99.0, "eval_images_s": 99.0}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nih_estimate.py"), str(tmp_path / "t.jsonl"),
                          "--other-share", "0.05", "--json"], capture_output=True, text=True, timeout=60)
    got = {(r["dp"], r["devices"]): r["hours"] for r in map(json.loads, out.stdout.splitlines())}
    # 73,545 training and 12,979 validation images a round, 25,596 test images once
    one_device = (50 * (73_545 / 10 + 12_979 / 40) / 0.95 + 25_596 / 40) / 3600
    assert got[(False, 1)] == round(one_device, 2) and got[(False, 4)] == round(one_device / 4, 2)
    assert got[(True, 1)] == round((50 * (73_545 / 2.5 + 12_979 / 40) / 0.95 + 25_596 / 40) / 3600, 2)
