"""The shapes a site's data takes in memory: ``Split`` (images and labels), ``SiteData`` (a site's
train / val / test splits and what the model needs to know of them) and ``as_float``.

A leaf module (it imports nothing of ours): ``data`` produces these, and ``models``, ``train``,
``privacy`` and ``attacks`` consume them without importing the loaders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SiteData", "Split", "as_float"]


@dataclass(frozen=True)
class Split:
    # N x C x H x W: float32 in [-1, 1], or the uint8 pixels of a compact split (``as_float``
    # turns a batch of either into the float form, where it trains: on a GPU, after the copy)
    images: torch.Tensor
    labels: torch.Tensor  # N int64 (binary, multi-class) or N x L float32 (multi-label)

    def __len__(self) -> int:
        return len(self.labels)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """A batch of a split's images as float32 in [-1, 1]: uint8 pixels are scaled by the same
    operations, in the same order, as ``data.loaders.to_split`` uses, so a compact split trains bit for bit
    as its float form."""
    if x.dtype != torch.uint8:
        return x
    return x.float().div_(255.0).mul_(2.0).sub_(1.0)


@dataclass(frozen=True)
class SiteData:
    train: Split
    val: Split
    test: Split
    official_test: bool  # test is the data set's official test split (else a held-out patient split)
    channels: int
    num_classes: int  # model outputs: classes, or labels for multi-label
    task: str
    label_names: tuple[str, ...]
