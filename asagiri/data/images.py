"""Decoding image files into uint8 arrays, once: the image-folder + CSV path the ISIC 2020,
ChestX-ray14 and bundled DermaMNIST loaders share.

Decoded arrays are cached in ``cache_dir`` as ``.npy`` keyed by a hash of the file list and the
target size, so a site decodes its JPEGs or PNGs once and later runs load in milliseconds.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["decode_all", "decode_image", "grouped_split"]


def decode_image(data: bytes | Path, size: int, channels: int) -> np.ndarray:
    """One image as ``size x size`` (x3 for RGB) uint8, resized with antialiasing."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(img, dtype=np.uint8)


def decode_all(
    names: Sequence[str],
    read: Callable[[str], bytes | Path],
    *,
    size: int,
    channels: int,
    cache_dir: Path | None = None,
) -> np.ndarray:
    """Decode ``names`` in order (``read`` gives each file's bytes or path), through the cache."""
    key = hashlib.sha256(f"{size}|{channels}|".encode() + "\n".join(names).encode()).hexdigest()[:24]
    cached = cache_dir / f"images-{key}.npy" if cache_dir is not None else None
    if cached is not None and cached.exists():
        return np.load(cached, allow_pickle=False)
    shape = (len(names), size, size) if channels == 1 else (len(names), size, size, 3)
    out = np.empty(shape, dtype=np.uint8)
    for i, name in enumerate(names):
        out[i] = decode_image(read(name), size, channels)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npy")
        np.save(tmp, out, allow_pickle=False)
        tmp.replace(cached)
    return out


def grouped_split(groups: Sequence[str], fractions: tuple[float, float], *, seed: int) -> np.ndarray:
    """0 = train, 1 = val, 2 = test for each row, the same for every row of one group (patient).

    Deterministic: each group's place follows a keyed hash of its id, so no patient ever lands on
    two sides, whatever the row order.
    """
    val_f, test_f = fractions
    out = np.empty(len(groups), dtype=np.int8)
    for i, g in enumerate(groups):
        h = int.from_bytes(hashlib.blake2b(f"{seed}|{g}".encode(), digest_size=8).digest(), "big") / 2**64
        out[i] = 2 if h < test_f else (1 if h < test_f + val_f else 0)
    return out
