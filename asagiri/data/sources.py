"""Readers for the data sets a site may hold. Each reads files the user already has (never downloads)
and returns a :class:`RawDataset`: uint8 images per split, labels, the task type, and per-image
metadata that feature-shift partitions use.

- MedMNIST ``.npz`` of any subset and size (28/64/128/224), with its own train/val/test keys; the
  task is read off the labels (one column with two values: binary; one column with more: multi-
  class; several 0/1 columns: multi-label).
- The bundled DermaMNIST JPEG archive (a lossy re-encoding of the official set, see
  ``bundled/DERMAMNIST_PROVENANCE.md``), read through the same image + CSV path as ISIC 2020.
- ISIC 2020: ``train.csv`` + a JPEG folder; binary melanoma target; patient-grouped splits.
- NIH ChestX-ray14: ``Data_Entry_2017.csv`` + image folders; 14 labels ("No Finding" = all zero);
  the official ``train_val_list.txt`` / ``test_list.txt`` when present; patient-grouped splits.

ISIC 2020 and ChestX-ray14 hand back their images as :class:`~asagiri.data.cache.ImageFiles`:
splits and partitions come from the CSV alone, and a site decodes only the files it takes.
"""

from __future__ import annotations

import csv
import io
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import DEFAULT_DECODE, DecodeSettings, ImageFiles, npz_images
from .images import decode_all, grouped_split

__all__ = [
    "NIH_LABELS",
    "RawDataset",
    "dermamnist_archive",
    "isic2020",
    "medmnist_npz",
    "nih_chestxray14",
    "synthetic",
    "task_of",
]

NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
DERMA_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
SPLITS = ("train", "val", "test")


@dataclass
class RawDataset:
    # split -> N x H x W (x 3) uint8, or the image files, decoded only for the rows a site takes
    images: dict[str, np.ndarray | ImageFiles]
    labels: dict[str, np.ndarray]  # split -> N (class ids) or N x L (0/1)
    task: str  # "binary" | "multiclass" | "multilabel"
    num_outputs: int
    label_names: list[str]
    meta: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # split -> key -> values
    official_test: bool = True

    @property
    def channels(self) -> int:
        return 1 if self.images["train"].ndim == 3 else 3


def task_of(labels: np.ndarray) -> tuple[str, int]:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        return "multilabel", labels.shape[1]
    classes = int(labels.max()) + 1
    return ("binary", 2) if classes <= 2 else ("multiclass", classes)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    from PIL import Image

    mode = "L" if images.ndim == 3 else "RGB"
    return np.stack(
        [np.asarray(Image.fromarray(im, mode).resize((size, size), Image.Resampling.BILINEAR)) for im in images]
    )


def medmnist_npz(path: Path, image_size: int, *, cache_dir: Path | None = None) -> RawDataset:
    """A MedMNIST file.  With a ``cache_dir`` its images are memory-mapped from there (extracted
    and resized once, ``cache.npz_images``), so a site holds only the rows of its share."""
    try:
        return _medmnist_npz(path, image_size, cache_dir)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable MedMNIST .npz ({exc})") from None


def _medmnist_npz(path: Path, image_size: int, cache_dir: Path | None) -> RawDataset:
    with np.load(path, allow_pickle=False) as npz:
        missing = {f"{s}_{k}" for s in SPLITS for k in ("images", "labels")} - set(npz.files)
        if missing:
            raise ValueError(f"{path}: not a MedMNIST file (missing {sorted(missing)})")
        if cache_dir is None:
            images = {s: _resize(npz[f"{s}_images"], image_size) for s in SPLITS}
        else:
            images = {s: npz_images(path, f"{s}_images", size=image_size, cache_dir=cache_dir, resize=_resize)
                      for s in SPLITS}
        raw = {s: npz[f"{s}_labels"] for s in SPLITS}
    task, outputs = task_of(np.concatenate([raw[s] for s in SPLITS]))
    labels = {s: (raw[s].astype(np.uint8) if task == "multilabel" else raw[s].reshape(-1).astype(np.int64))
              for s in SPLITS}
    return RawDataset(images, labels, task, outputs, [str(i) for i in range(outputs)])


def dermamnist_archive(path: Path, image_size: int, *, cache_dir: Path | None) -> RawDataset:
    """The bundled archive: ``images/DermaMNIST_<split>_NNNNN.jpg`` + ``HAM10000_metadata.csv``."""
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        rows = list(csv.DictReader(io.TextIOWrapper(tar.extractfile(members["HAM10000_metadata.csv"]))))  # type: ignore[arg-type]
        images, labels = {}, {}
        for split in SPLITS:
            chosen = sorted(r["image_id"] for r in rows if r["image_id"].startswith(f"DermaMNIST_{split}_"))
            by_id = {r["image_id"]: r for r in rows}
            labels[split] = np.array([DERMA_CLASSES.index(by_id[i]["dx"]) for i in chosen], dtype=np.int64)

            def read(name: str) -> bytes:
                return tar.extractfile(members[f"{name}.jpg"]).read()  # type: ignore[union-attr]

            images[split] = decode_all(chosen, read, size=image_size, channels=3, cache_dir=cache_dir)
    return RawDataset(images, labels, "multiclass", len(DERMA_CLASSES), list(DERMA_CLASSES))


def isic2020(
    root: Path, image_size: int, *, cache_dir: Path | None, seed: int = 0, val_fraction: float,
    decode: DecodeSettings = DEFAULT_DECODE,
) -> RawDataset:
    """``root/train.csv`` and JPEGs in ``root/jpeg/train``, ``root/train`` or ``root``.

    No official split: patients go to validation (``val_fraction``) and test (0.15) at random.
    """
    csv_path = root / "train.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"{root}: ISIC 2020 needs train.csv")
    rows = list(csv.DictReader(csv_path.open()))
    need = {"image_name", "patient_id", "anatom_site_general_challenge", "target"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{csv_path}: missing columns {sorted(need - set(rows[0]))}")
    folder = next((d for d in (root / "jpeg" / "train", root / "train", root) if (d / f"{rows[0]['image_name']}.jpg").exists()),
                  None) if rows else root
    if folder is None:
        raise FileNotFoundError(f"{root}: no JPEG folder holding {rows[0]['image_name']}.jpg")
    split = grouped_split([r["patient_id"] for r in rows], (val_fraction, 0.15), seed=seed)
    images, labels, meta = {}, {}, {}
    for k, name in enumerate(SPLITS):
        sel = [r for r, s in zip(rows, split, strict=True) if s == k]
        names = [r["image_name"] for r in sel]
        images[name] = ImageFiles([folder / f"{n}.jpg" for n in names], size=image_size, channels=3,
                                  cache_dir=cache_dir, settings=decode)
        labels[name] = np.array([int(r["target"]) for r in sel], dtype=np.int64)
        meta[name] = {
            "patient": np.array([r["patient_id"] for r in sel]),
            "site": np.array([r["anatom_site_general_challenge"] or "unknown" for r in sel]),
        }
    return RawDataset(images, labels, "binary", 2, ["benign", "melanoma"], meta, official_test=False)


def nih_chestxray14(
    root: Path, image_size: int, *, cache_dir: Path | None, seed: int = 0, val_fraction: float,
    decode: DecodeSettings = DEFAULT_DECODE,
) -> RawDataset:
    """``root/Data_Entry_2017.csv``; images found under ``root`` (any ``images*/`` folders).

    ``val_fraction`` of the patients outside the test split go to validation.
    """
    csv_path = root / "Data_Entry_2017.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"{root}: ChestX-ray14 needs Data_Entry_2017.csv")
    rows = list(csv.DictReader(csv_path.open()))
    files = {p.name: p for p in root.rglob("*.png")}
    rows = [r for r in rows if r["Image Index"] in files]
    if not rows:
        raise FileNotFoundError(f"{root}: none of the CSV's images were found")
    official = (root / "test_list.txt").exists()
    if official:
        test_names = set((root / "test_list.txt").read_text().split())
        is_test = np.array([r["Image Index"] in test_names for r in rows])
        # train_val_list is split into train/val by patient; the official test list stays whole.
        split = np.where(is_test, 2, grouped_split([r["Patient ID"] for r in rows], (val_fraction, 0.0), seed=seed))
        leaked = {r["Patient ID"] for r, t in zip(rows, is_test, strict=True) if t} & {
            r["Patient ID"] for r, t in zip(rows, is_test, strict=True) if not t}
        if leaked:  # the official lists are patient-disjoint; refuse files that are not
            raise ValueError(f"{root}: test_list.txt shares {len(leaked)} patients with the other images")
    else:
        split = grouped_split([r["Patient ID"] for r in rows], (val_fraction, 0.2), seed=seed)
    images, labels, meta = {}, {}, {}
    for k, name in enumerate(SPLITS):
        sel = [r for r, s in zip(rows, split, strict=True) if s == k]
        images[name] = ImageFiles([files[r["Image Index"]] for r in sel], size=image_size, channels=1,
                                  cache_dir=cache_dir, settings=decode)
        lab = np.zeros((len(sel), len(NIH_LABELS)), dtype=np.uint8)
        for i, r in enumerate(sel):
            for finding in r["Finding Labels"].split("|"):
                if finding in NIH_LABELS:
                    lab[i, NIH_LABELS.index(finding)] = 1
        labels[name] = lab
        ages = np.array([int(r.get("Patient Age") or 0) for r in sel])
        meta[name] = {
            "patient": np.array([r["Patient ID"] for r in sel]),
            "view": np.array([r.get("View Position", "?") for r in sel]),
            "age_band": np.digitize(ages, [20, 40, 60]).astype(str),
        }
    return RawDataset(images, labels, "multilabel", len(NIH_LABELS), list(NIH_LABELS), meta, official_test=official)


def synthetic(n: int, *, seed: int, size: int = 28) -> RawDataset:
    """Two learnable classes: a bright blob left (0) or right (1) of centre, plus noise."""
    images, labels = {}, {}
    for k, split in enumerate(SPLITS):
        m = n if split == "train" else max(64, n // 4)
        rng = np.random.default_rng(seed * 7 + k)
        y = rng.integers(0, 2, size=m)
        yy, xx = np.mgrid[0:size, 0:size]
        img = rng.normal(90, 25, size=(m, size, size)).astype(np.float32)
        for i, lab in enumerate(y):
            cx = size * (0.3 if lab == 0 else 0.7) + rng.normal(0, 1.5)
            cy = size * 0.5 + rng.normal(0, 3)
            img[i] += 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (size / 8) ** 2))
        images[split] = np.clip(img, 0, 255).astype(np.uint8)
        labels[split] = y.astype(np.int64)
    return RawDataset(images, labels, "binary", 2, ["left", "right"])
