"""ScatterNet features and a linear head on them (Tramèr & Boneh 2021, "Differentially Private
Learning Needs Better Features (or Much More Data)").

A scattering transform (Mallat; kymatio's implementation, J = 2 scales, L = 8 angles) is a fixed
cascade of wavelet filters and moduli: no trained weights, no data in it.  It turns a C x H x W
image into 81*C channels at H/4 x W/4.  A linear model on those features has few parameters (8k
for a 28 px, 2-class task), so DP-SGD's noise, which grows with the parameter count, hurts it far
less than it hurts a CNN trained end to end.

Because the transform is fixed and the same for every site, a site computes its features once,
when it loads its data (``featurise``), and trains and evaluates the head on them.  No
augmentation applies: shifting 7 x 7 feature maps is not shifting the image.
"""

from __future__ import annotations

import logging
import time
from functools import cache

import torch
from torch import nn

from ..splits import SiteData, Split, as_float
from .registry import _norm

__all__ = ["SCATTER_CHANNELS", "ScatterLinear", "featurise", "featurise_split", "scatter_features", "scattering"]

log = logging.getLogger(__name__)

SCATTER_J, SCATTER_L = 2, 8
SCATTER_CHANNELS = 1 + SCATTER_J * SCATTER_L + SCATTER_L**2 * SCATTER_J * (SCATTER_J - 1) // 2  # 81 per input channel
_GRID = 7  # features are pooled to 7 x 7 (the native size at 28 px) so the head fits any image size
_BATCH = 512


@cache
def scattering(height: int, width: int):  # type: ignore[no-untyped-def]
    """The (differentiable) scattering transform for images of ``height`` x ``width``, built once."""
    # kymatio.torch also imports the 3-D scattering, which needs a SciPy function (sph_harm) that
    # SciPy 1.15 removed; the 2-D front end alone does not.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=SCATTER_J, shape=(height, width), L=SCATTER_L)


def scatter_features(images: torch.Tensor) -> torch.Tensor:
    """N x C x H x W images -> N x 81C x 7 x 7 scattering coefficients (float32, on the CPU)."""
    if images.dim() != 4:
        raise ValueError(f"expected N x C x H x W images, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if h < 4 * _GRID // 2 or w < 4 * _GRID // 2:
        raise ValueError(f"images of {h} x {w} px are too small for the scattering transform (at least 14 x 14)")
    transform = scattering(h, w)
    out = []
    with torch.no_grad():
        for start in range(0, n, _BATCH):
            coeffs = transform(as_float(images[start : start + _BATCH]).float().cpu())  # B x C x 81 x H/4 x W/4
            coeffs = coeffs.flatten(1, 2)
            if coeffs.shape[-2:] != (_GRID, _GRID):
                coeffs = nn.functional.adaptive_avg_pool2d(coeffs, _GRID)
            out.append(coeffs)
    if not out:
        return torch.zeros(0, c * SCATTER_CHANNELS, _GRID, _GRID)
    return torch.cat(out).contiguous()


def featurise_split(split: Split) -> Split:
    """One split with its images replaced by their scattering features."""
    return Split(scatter_features(split.images), split.labels)


def featurise(data: SiteData) -> SiteData:
    """The site's splits with images replaced by their scattering features (computed once)."""
    t0 = time.perf_counter()
    out = SiteData(
        train=featurise_split(data.train), val=featurise_split(data.val), test=featurise_split(data.test),
        official_test=data.official_test, channels=data.channels, num_classes=data.num_classes, task=data.task,
        label_names=data.label_names,
    )
    log.info("scatter_linear: fixed features of %d images computed in %.1f s",
             len(data.train) + len(data.val) + len(data.test), time.perf_counter() - t0)
    return out


class ScatterLinear(nn.Module):
    """GroupNorm (data normalisation, as Tramèr & Boneh) and one linear layer, on ScatterNet
    features of an ``in_channels``-channel image.

    The GroupNorm keeps its per-channel scale and shift (162 weights for one input channel), so
    FedBN has something to keep on the site.
    """

    def __init__(self, in_channels: int, num_classes: int, *, groups: int = 27):
        super().__init__()
        channels = in_channels * SCATTER_CHANNELS
        self.norm = _norm("group", channels, groups)  # groups lowered to a divisor of the channel count
        self.head = nn.Linear(channels * _GRID * _GRID, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.norm(x).flatten(1))
