"""How close a reconstruction is to its original (SSIM and PSNR, scikit-image), and how well a
membership attack separates members from non-members (AUC, TPR at a fixed FPR, scikit-learn)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = ["ImageScores", "closest_image", "match_images", "membership_scores", "score_each", "tpr_at_fpr"]


@dataclass(frozen=True)
class ImageScores:
    """Per original image: the SSIM and PSNR of the reconstruction matched to it."""

    ssim: list[float]
    psnr: list[float]
    alignment: str  # what the attack was allowed before scoring
    order: list[int]  # the reconstruction matched to each original

    @property
    def ssim_mean(self) -> float:
        return float(np.mean(self.ssim))

    @property
    def ssim_max(self) -> float:
        return float(np.max(self.ssim))

    @property
    def ssim_min(self) -> float:
        return float(np.min(self.ssim))

    @property
    def psnr_mean(self) -> float:
        return float(np.mean(self.psnr))


def _pair(original: np.ndarray, recon: np.ndarray, data_range: float) -> tuple[float, float]:
    o, r = original.astype(np.float64), np.clip(recon.astype(np.float64), original.min(), original.max())
    channel = 0 if o.ndim == 3 and o.shape[0] > 1 else None
    if channel is None and o.ndim == 3:
        o, r = o[0], r[0]
    ssim = structural_similarity(o, r, data_range=data_range, channel_axis=channel)
    psnr = peak_signal_noise_ratio(o, r, data_range=data_range)
    return float(ssim), float(min(psnr, 100.0))


def match_images(originals: np.ndarray, reconstructions: np.ndarray, *, data_range: float) -> ImageScores:
    """Score each original against a reconstruction.  With several images the attacker does not
    know which reconstruction is which, so they are paired by the assignment that maximises the
    total SSIM (the Hungarian method): the best alignment an attacker could claim, reported as
    ``permutation``.  One image: ``none``."""
    if len(originals) == 0:
        raise ValueError("nothing to score")
    table = np.array([[_pair(o, r, data_range) for r in reconstructions] for o in originals])  # N x M x 2
    if len(originals) == 1 and len(reconstructions) == 1:
        return ImageScores([float(table[0, 0, 0])], [float(table[0, 0, 1])], "none", [0])
    rows, cols = linear_sum_assignment(-table[:, :, 0])
    ssim = [float(table[i, j, 0]) for i, j in zip(rows, cols, strict=True)]
    psnr = [float(table[i, j, 1]) for i, j in zip(rows, cols, strict=True)]
    return ImageScores(ssim, psnr, "permutation", [int(j) for j in cols])


def score_each(originals: np.ndarray, reconstructions: np.ndarray, *, data_range: float) -> ImageScores:
    """Each reconstruction against its own original: one observation per image, so there is
    nothing to align (``none``)."""
    if len(originals) == 0 or len(originals) != len(reconstructions):
        raise ValueError(f"{len(originals)} originals for {len(reconstructions)} reconstructions")
    pairs = [_pair(o, r, data_range) for o, r in zip(originals, reconstructions, strict=True)]
    return ImageScores([s for s, _ in pairs], [p for _, p in pairs], "none", list(range(len(pairs))))


def closest_image(pool: np.ndarray, image: np.ndarray, *, data_range: float) -> tuple[int, float, float]:
    """The image of ``pool`` most similar to ``image``: (its index, SSIM, PSNR), in one pass."""
    best = (-1, -np.inf, 0.0)
    for i, candidate in enumerate(pool):
        ssim, psnr = _pair(candidate, image, data_range)
        if ssim > best[1]:
            best = (i, ssim, psnr)
    return best


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """The highest true-positive rate at a false-positive rate of at most ``fpr``."""
    fprs, tprs, _ = roc_curve(labels, scores)
    ok = fprs <= fpr
    return float(tprs[ok].max()) if ok.any() else 0.0


def membership_scores(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, float]:
    """AUC and TPR at 1% and 0.1% FPR, where a higher score means "member"."""
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    scores = np.r_[member_scores, nonmember_scores]
    return {
        "mia_auc": float(roc_auc_score(labels, scores)),
        "tpr_at_1pct_fpr": tpr_at_fpr(labels, scores, 0.01),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(labels, scores, 0.001),
        "members": int(len(member_scores)),
        "nonmembers": int(len(nonmember_scores)),
    }
