"""The reference federation's duration, estimated from measured throughput.

    python benchmarks/nih_estimate.py benchmarks/results/train-throughput-cpu-2026-12-06.jsonl
    python benchmarks/nih_estimate.py results-from-a-gpu.jsonl --other-share 0.05

The reference system trains 50 rounds of a 4-site NIH ChestX-ray14 split (ResNet-18, 224 px) in
3 hours on one RTX 4090.  This reads the ResNet-18 224 px rows of ``train_throughput.py``'s JSON
lines (the site's own path: ``ours_images_s`` for training, ``eval_images_s`` for scoring) and
works out what ``examples/nih-chestxray14-224.yaml`` would take at those rates:

- the images: 112,120 in all; the official test list holds 25,596, the other 86,524 are split by
  patient into validation (``val_fraction`` 0.15: about 12,979) and training (about 73,545);
- each round every site trains one local epoch on its share and scores its validation share, so
  a round trains 73,545 images and scores 12,979 in all, whatever the number of sites; the final
  model is scored once on the test list;
- on one device (the reference's case) the sites' work adds up; with one device per site it runs
  side by side, a quarter each;
- the runtime's own share of a round (selection, keys, masking, transport, checkpoint, audit) is
  ``--other-share``, from ``round_overhead.py`` (2.9% measured with secure aggregation on).

It is an estimate from rates measured on small batches of random images, not a measured run:
decoding (once, into the cache) and the data loader's own cost are not in it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REFERENCE_HOURS = 3.0
ROUNDS, SITES = 50, 4
TEST, TRAIN_VAL, VAL_FRACTION = 25_596, 86_524, 0.15
VAL = round(TRAIN_VAL * VAL_FRACTION)
TRAIN = TRAIN_VAL - VAL


def estimate(train_ips: float, eval_ips: float, other_share: float, devices: int) -> float:
    """Hours for the 50 rounds and the final test on ``devices`` devices (1, or one per site)."""
    per_round = (TRAIN / train_ips + VAL / eval_ips) / (1 - other_share)
    return (ROUNDS * per_round + TEST / eval_ips) / devices / 3600


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("throughput", type=Path, help="train_throughput.py --json output")
    p.add_argument("--other-share", type=float, default=0.029)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in args.throughput.read_text().splitlines() if line.strip()]
    picked = {r["dp"]: r for r in rows if r["model"] == "resnet18" and r["size"] == 224}
    if False not in picked or "eval_images_s" not in picked[False]:
        print(f"{args.throughput}: no ResNet-18 224 px row without DP (with eval_images_s)", file=sys.stderr)
        return 2
    eval_ips = picked[False]["eval_images_s"]
    out = []
    for dp, row in sorted(picked.items()):
        for devices in (1, SITES):
            hours = estimate(row["ours_images_s"], eval_ips, args.other_share, devices)
            out.append({"dp": dp, "device": row["device"], "accel": row["accel"], "devices": devices,
                        "train_images_s": row["ours_images_s"], "eval_images_s": eval_ips,
                        "train_images_per_round": TRAIN, "val_images_per_round": VAL,
                        "hours": round(hours, 2), "vs_reference": round(hours / REFERENCE_HOURS, 2)})
    for o in out:
        print(json.dumps(o) if args.json else
              f"{'DP' if o['dp'] else 'plain':5s} on {o['devices']} {o['device']} device(s) ({o['accel']}): "
              f"{o['hours']:.1f} h, {o['vs_reference']:.1f}x the reference's {REFERENCE_HOURS:g} h "
              f"({o['train_images_s']} img/s training, {o['eval_images_s']} scoring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
