"""Per-site data: the bundled PneumoniaMNIST file (or any file of that layout) and a synthetic set.

Each site computes the same seeded partition of the shared file and keeps its own share, which
is how the single-machine demo simulates hospitals; a real site points ``data_path`` at its own
files.  Images become float tensors normalised to [-1, 1] once, at load, and stay cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .partition import partition

__all__ = ["BUNDLED_PNEUMONIAMNIST", "SiteData", "Split", "dataset_info", "load_site_data"]

BUNDLED_PNEUMONIAMNIST = "pneumoniamnist.npz"


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # N x C x H x W, float32
    labels: torch.Tensor  # N, int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SiteData:
    train: Split
    val: Split
    test: Split | None
    channels: int
    num_classes: int


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("asagiri.data").joinpath("bundled", name)))


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    else:
        x = x.permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(np.int64))
    return Split(x, y)


def _medmnist_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        missing = {"train_images", "train_labels", "val_images", "val_labels"} - set(npz.files)
        if missing:
            raise ValueError(f"{path}: not a MedMNIST file (missing {sorted(missing)})")
        return {k: npz[k] for k in npz.files}


def synthetic_arrays(n: int, *, seed: int, size: int = 28, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two learnable classes: a bright blob left (0) or right (1) of centre, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    yy, xx = np.mgrid[0:size, 0:size]
    images = rng.normal(90, 25, size=(n, size, size)).astype(np.float32)
    for i, y in enumerate(labels):
        cx = size * (0.3 if y == 0 else 0.7) + rng.normal(0, 1.5)
        cy = size * 0.5 + rng.normal(0, 3)
        images[i] += 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (size / 8) ** 2))
    images = np.clip(images, 0, 255).astype(np.uint8)
    if channels > 1:
        images = np.repeat(images[..., None], channels, axis=-1)
    return images, labels.reshape(-1, 1)


def dataset_info(dataset: str, path: Path | None) -> tuple[int, int]:
    """(channels, classes) without loading images, so a coordinator needs no data of its own."""
    if dataset == "synthetic":
        return 1, 2
    if dataset == "pneumoniamnist":
        return 1, 2
    raise ValueError(f"unknown dataset {dataset!r}")


def load_site_data(
    *,
    dataset: str,
    path: Path | None,
    site_index: int,
    num_sites: int,
    scheme: str,
    alpha: float,
    seed: int,
    synthetic_samples: int = 512,
) -> SiteData:
    if dataset == "synthetic":
        arrays = {}
        for stream, split in enumerate(("train", "val", "test")):
            n = synthetic_samples if split == "train" else max(64, synthetic_samples // 4)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = synthetic_arrays(n, seed=seed * 7 + stream)
    elif dataset == "pneumoniamnist":
        arrays = _medmnist_npz(path or bundled_path(BUNDLED_PNEUMONIAMNIST))
    else:
        raise ValueError(f"unknown dataset {dataset!r}")

    def share(split: str, stream: int, site_scheme: str) -> Split:
        labels = arrays[f"{split}_labels"]
        parts = partition(labels, num_sites, scheme=site_scheme, alpha=alpha, seed=seed, stream=stream)
        idx = parts[site_index]
        return _to_split(arrays[f"{split}_images"][idx], labels[idx])

    train = share("train", 0, scheme)
    # Validation follows the site's own label mix; the official test split is shared out evenly
    # and only used for the final, pooled score.
    val = share("val", 1, scheme)
    test = share("test", 2, "iid") if "test_images" in arrays else None
    num_classes = int(max(arrays["train_labels"].max(), arrays["val_labels"].max())) + 1
    channels = train.images.shape[1]
    return SiteData(train=train, val=val, test=test, channels=channels, num_classes=max(2, num_classes))
