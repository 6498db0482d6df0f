"""Per-site data: open a data set, take this site's share of each split, normalise once, cache.

For the single-machine demo every site opens the same file and keeps its share of a seeded
partition, which is how we simulate hospitals; a real site points ``data_path`` at its own files
and uses ``scheme: iid`` with one site (its whole set).  Images become float tensors in [-1, 1]
once, at load, and stay in memory.

The ``feature`` scheme gives each site a different acquisition: for ChestX-ray14 the sites split
the ``View Position`` values (or patient age bands) between them, for ISIC 2020 the anatomical
sites; MedMNIST-style sets have no such metadata, so each site gets an IID share with a
**simulated** acquisition profile (brightness, contrast, gamma, blur) applied to all its splits.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..config.site import PolicyConfig
from ..splits import SiteData, Split, as_float
from .cache import DEFAULT_DECODE, DecodeSettings, ImageFiles
from .partition import dirichlet_draw, feature_partition, partition, proportional_partition
from .sources import RawDataset, dermamnist_archive, isic2020, medmnist_npz, nih_chestxray14, synthetic

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = [
    "ACQUISITION_PROFILES",
    "BUNDLED",
    "SiteData",
    "Split",
    "as_float",
    "dataset_info",
    "load_site_data",
    "open_dataset",
    "skew_labels",
]

BUNDLED = {
    "pneumoniamnist": "pneumoniamnist.npz",
    "dermamnist": "dermamnist_jpeg28_source.tar.gz",
}

# Patients held out for validation where the files have no validation split (ISIC, ChestX-ray14).
# ``DataConfig.val_fraction`` and ``asagiri partition --val-fraction`` default to the same value
# (tests/test_config.py holds them together).
VAL_FRACTION = 0.15

# (brightness offset, contrast, gamma, blur sigma in pixels): simulated scanners, site i uses i mod 4.
ACQUISITION_PROFILES = ((0.0, 1.0, 1.0, 0.0), (0.10, 0.75, 1.3, 0.0), (-0.10, 1.25, 0.8, 0.0), (0.0, 0.9, 1.0, 1.0))

FEATURE_KEYS = {"nih": "view", "isic": "site"}


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("asagiri.data").joinpath("bundled", name)))


def open_dataset(
    dataset: str, path: Path | None, *, image_size: int = 28, cache_dir: Path | None = None, seed: int = 0,
    synthetic_samples: int = 512, val_fraction: float = VAL_FRACTION, decode: DecodeSettings = DEFAULT_DECODE,
) -> RawDataset:
    """The whole data set, split into train / val / test.

    ``val_fraction`` applies only where the files have no validation split of their own
    (ISIC 2020, ChestX-ray14): that fraction of patients is held out for validation.
    """
    if not 0 < val_fraction < 0.8:
        raise ValueError(f"val_fraction={val_fraction}: must be between 0 and 0.8")
    if dataset == "synthetic":
        return synthetic(synthetic_samples, seed=seed, size=image_size)
    if dataset in ("pneumoniamnist", "medmnist"):
        if path is None and dataset == "medmnist":
            raise ValueError("data.dataset=medmnist needs data.path (a MedMNIST .npz file)")
        raw = medmnist_npz(path or bundled_path(BUNDLED["pneumoniamnist"]), image_size, cache_dir=cache_dir)
        if dataset == "pneumoniamnist":
            _check_classes(raw, path, dataset, 2)
            raw.label_names = ["normal", "pneumonia"]
        return raw
    if dataset == "dermamnist":
        target = path or bundled_path(BUNDLED["dermamnist"])
        if target.suffix == ".npz":
            return _check_classes(medmnist_npz(target, image_size, cache_dir=cache_dir), path, dataset, 7)
        return dermamnist_archive(target, image_size, cache_dir=cache_dir)
    if dataset == "isic":
        if path is None:
            raise ValueError("data.dataset=isic needs data.path (the folder holding train.csv)")
        return isic2020(path, image_size, cache_dir=cache_dir, seed=seed, val_fraction=val_fraction, decode=decode)
    if dataset == "nih":
        if path is None:
            raise ValueError("data.dataset=nih needs data.path (the folder holding Data_Entry_2017.csv)")
        return nih_chestxray14(path, image_size, cache_dir=cache_dir, seed=seed, val_fraction=val_fraction,
                               decode=decode)
    raise ValueError(f"unknown dataset {dataset!r}")


def _check_classes(raw: RawDataset, path: Path | None, dataset: str, classes: int) -> RawDataset:
    """A file given for a named data set holds labels of that set's classes, and the model is
    sized by the set, not by the labels one site happens to have (a site without the rarest
    class would otherwise size its model, and its ``W_0``, differently from every other)."""
    if raw.task == "multilabel" or raw.num_outputs > classes:
        raise ValueError(f"{path}: its labels are of {raw.num_outputs} classes ({raw.task}), but {dataset} has "
                         f"{classes}: is it another MedMNIST set? (data.dataset=medmnist takes any)")
    raw.num_outputs, raw.task = classes, "binary" if classes == 2 else "multiclass"
    raw.label_names = [str(i) for i in range(classes)]
    return raw


def dataset_info(dataset: str, path: Path | None) -> tuple[int, int]:
    """(channels, model outputs) without decoding images where the format allows it."""
    known = {"synthetic": (1, 2), "pneumoniamnist": (1, 2), "dermamnist": (3, 7), "isic": (3, 2), "nih": (1, 14)}
    if dataset in known:  # a named set's file holds its classes (``_check_classes``)
        return known[dataset]
    if path is None:
        raise ValueError(f"data.dataset={dataset} needs data.path on the coordinator to size the model")
    with np.load(path, allow_pickle=False) as npz:
        images = npz["val_images"]
        labels = np.concatenate([npz[f"{s}_labels"] for s in ("train", "val", "test")])
    from .sources import task_of

    return (1 if images.ndim == 3 else 3), task_of(labels)[1]


def skew_labels(labels: np.ndarray) -> np.ndarray:
    """One class id per sample for label-skew partitions (multi-label: first finding, 0 = none)."""
    if labels.ndim == 2:
        has = labels.any(axis=1)
        return np.where(has, labels.argmax(axis=1) + 1, 0)
    return labels


def to_split(images: np.ndarray, labels: np.ndarray, task: str, profile: tuple | None,
             compact: bool = False) -> Split:
    """Tensors of a share.  ``compact`` keeps the images as uint8 (a quarter of the memory; each
    batch is scaled by ``as_float`` where it trains), unless a simulated acquisition profile
    has to change the pixels."""
    u8 = images[:, None] if images.ndim == 3 else np.moveaxis(images, -1, 1)  # N x C x H x W views
    y = torch.from_numpy(labels.astype(np.float32) if task == "multilabel" else labels.astype(np.int64))
    if compact and profile is None:
        return Split(torch.from_numpy(np.ascontiguousarray(u8)), y)
    # one float copy of the (possibly memory-mapped) uint8 images, then in place: at 224 px the
    # share's float tensor is the site's largest allocation, and a second one would double its peak
    x = torch.from_numpy(u8.astype(np.float32, order="C"))  # the one float copy (the images may be a read-only map)
    x.div_(255.0)
    if profile is not None:
        x = _acquisition(x, profile)
    x.mul_(2.0).sub_(1.0)
    return Split(x, y)


def _acquisition(x: torch.Tensor, profile: tuple) -> torch.Tensor:
    offset, contrast, gamma, blur = profile
    x = x.clamp(0, 1) ** gamma
    x = ((x - 0.5) * contrast + 0.5 + offset).clamp(0, 1)
    if blur > 0:
        r = max(1, int(3 * blur))
        k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * blur**2))
        k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k, groups=x.shape[1])
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(2, 3), groups=x.shape[1])
    return x


def site_indices(
    raw: RawDataset, dataset: str, split: str, num_sites: int, *, scheme: str, alpha: float, seed: int,
    feature_key: str | None = None, test_follows_site: bool = False,
) -> list[np.ndarray]:
    """Each site's indices into ``split``; every sample goes to exactly one site.

    Under label skew the validation split follows each site's training label mix. The official
    test split is shared out evenly (its label mix stays the population's) unless
    ``test_follows_site``: then it follows the sites' mixes too, which scores each site's own
    model on patients like its own, but lets a model score well by knowing only its site's prior.
    """
    stream = ("train", "val", "test").index(split)
    labels = skew_labels(raw.labels[split])
    if scheme == "feature":
        key = feature_key or FEATURE_KEYS.get(dataset)
        if key is not None and key in raw.meta.get(split, {}):
            return feature_partition(raw.meta[split][key], num_sites, seed=seed)
        scheme = "iid"  # simulated acquisition shift instead (applied in load_site_data)
    if scheme == "dirichlet" and (split != "test" or test_follows_site):
        # The proportions are drawn once, on train, and reused for the held-out split.
        # A simulated split never gives a site fewer training examples than the default policy
        # trains on (policy.min_examples): the demo on a small file would end with "refused".
        train_parts, proportions = dirichlet_draw(skew_labels(raw.labels["train"]), num_sites, alpha,
                                                  rng=np.random.default_rng([seed, 0]),
                                                  min_size=PolicyConfig().min_examples)
        if split == "train":
            return train_parts
        return proportional_partition(labels, proportions, rng=np.random.default_rng([seed, stream]))
    if split == "test":
        scheme = "iid"  # the official test set is shared out evenly; its label mix stays the population's
    floor = PolicyConfig().min_examples if split == "train" else None
    return partition(labels, num_sites, scheme=scheme, alpha=alpha, seed=seed, stream=stream, min_size=floor)


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
    image_size: int = 28,
    cache_dir: Path | None = None,
    feature_key: str | None = None,
    val_fraction: float = VAL_FRACTION,
    decode: DecodeSettings = DEFAULT_DECODE,
    compact: bool = False,
) -> SiteData:
    """Site ``site_index``'s share of each split.  The partition is drawn from the labels and
    metadata alone; only the share's images are then decoded (or read from the cache).
    ``compact``: the images stay uint8 (``to_split``)."""
    raw = open_dataset(dataset, path, image_size=image_size, cache_dir=cache_dir, seed=seed,
                       synthetic_samples=synthetic_samples, val_fraction=val_fraction, decode=decode)
    simulated = scheme == "feature" and (feature_key or FEATURE_KEYS.get(dataset)) is None
    profile = ACQUISITION_PROFILES[site_index % len(ACQUISITION_PROFILES)] if simulated else None
    splits = {}
    for split in ("train", "val", "test"):
        parts = site_indices(raw, dataset, split, num_sites, scheme=scheme, alpha=alpha, seed=seed,
                             feature_key=feature_key)
        idx = parts[site_index]
        images, kept = take(raw.images[split], idx)
        splits[split] = to_split(images, raw.labels[split][idx][kept], raw.task, profile, compact=compact)
    return SiteData(
        train=splits["train"], val=splits["val"], test=splits["test"], official_test=raw.official_test,
        channels=raw.channels, num_classes=raw.num_outputs, task=raw.task, label_names=tuple(raw.label_names),
    )


def take(images: np.ndarray | ImageFiles, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images at ``idx``, and which positions of ``idx`` they are (all, unless unreadable
    files were left out)."""
    if not isinstance(images, ImageFiles):
        return images[idx], np.arange(len(idx))
    decoded = images.take(idx)
    return decoded.images, decoded.kept


def load_configured_site(data: DataConfig, *, path: Path | None, site_index: int, num_sites: int,
                         cache_dir: Path | None = None, decode: DecodeSettings = DEFAULT_DECODE,
                         compact: bool = False) -> SiteData:
    """Site ``site_index``'s share as a run's ``data`` config partitions it: what the site trains
    on, and what anything rebuilding a run's data (the attack harness) must load the same way."""
    part = data.partition
    return load_site_data(
        dataset=data.dataset, path=path, site_index=site_index, num_sites=num_sites, scheme=part.scheme,
        alpha=part.alpha, seed=part.seed, synthetic_samples=data.synthetic_samples, image_size=data.image_size,
        cache_dir=cache_dir, feature_key=part.feature_key, val_fraction=data.val_fraction, decode=decode,
        compact=compact,
    )
