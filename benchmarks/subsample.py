"""A MedMNIST-format file sub-sampled to a small cohort, as many hospitals hold.

    python benchmarks/subsample.py asagiri/data/bundled/pneumoniamnist.npz --train 550 --out /tmp/pneumonia-550.npz
    python benchmarks/subsample.py dermamnist --train 550 --out /tmp/derma-550.npz
    python benchmarks/subsample.py dermamnist --train 550 --binary 4 --out /tmp/melanoma-550.npz

The source is a MedMNIST ``.npz`` or the name of a set Asagiri bundles (``pneumoniamnist``,
``dermamnist``: read through its own loader, so the JPEG archive of DermaMNIST works too).

Each split keeps at most its count of images, drawn with a seeded generator, every class kept in
its file's proportion (at least one image each); validation keeps ``--val`` images (default: a
seventh of ``--train``, MedMNIST's ratio) and the test split stays whole unless ``--test`` is given,
so that scores on the small cohort are measured on as many test images as the full file's.
``--binary K`` makes a new binary task, class ``K`` against the rest (DermaMNIST's 4: melanoma),
before the draw.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def stratified(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` positions of ``labels`` in the classes' own proportions, sorted."""
    flat = labels.reshape(len(labels), -1)[:, 0]
    if count >= len(flat):
        return np.arange(len(flat))
    classes, sizes = np.unique(flat, return_counts=True)
    quota = np.maximum(1, np.floor(sizes / sizes.sum() * count)).astype(int)
    for c in np.argsort(-sizes)[: max(0, count - int(quota.sum()))]:  # the remainder to the largest classes
        quota[c] += 1
    picked = [rng.choice(np.flatnonzero(flat == c), size=min(q, s), replace=False)
              for c, q, s in zip(classes, quota, sizes, strict=True)]
    return np.sort(np.concatenate(picked))


def splits_of(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of each split, uint8 images as MedMNIST stores them."""
    if Path(source).suffix == ".npz":
        with np.load(source) as f:
            return {s: (f[f"{s}_images"], f[f"{s}_labels"]) for s in ("train", "val", "test")}
    from asagiri.data.loaders import open_dataset

    raw = open_dataset(source, None)
    return {s: (np.asarray(raw.images[s]), np.asarray(raw.labels[s])) for s in ("train", "val", "test")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a MedMNIST .npz (train_/val_/test_ images and labels), or a bundled set's name")
    p.add_argument("--train", type=int, required=True)
    p.add_argument("--val", type=int, default=None)
    p.add_argument("--test", type=int, default=None)
    p.add_argument("--binary", type=int, default=None, help="label 1 for this class, 0 for every other")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    counts = {"train": args.train, "val": args.val or max(1, args.train // 7), "test": args.test}
    arrays = splits_of(args.source)
    out = {}
    for split, count in counts.items():
        images, labels = arrays[split]
        if args.binary is not None:
            labels = (labels == args.binary).astype(np.uint8)
        idx = np.arange(len(labels)) if count is None else stratified(labels, count, rng)
        out[f"{split}_images"], out[f"{split}_labels"] = images[idx], labels[idx].reshape(len(idx), -1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(args.out, {k: v.shape[0] for k, v in out.items() if k.endswith("labels")})


if __name__ == "__main__":
    main()
