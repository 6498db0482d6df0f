"""Scores of predicted probabilities against labels (scikit-learn): what a site reports on its
validation split and what the coordinator computes over the pooled test predictions.  A leaf
module, shared by both sides."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["accuracy_score", "auc_score"]


def accuracy_score(labels: np.ndarray, probs: np.ndarray) -> float:
    if len(labels) == 0:
        return 0.0
    if labels.ndim == 2:
        return float(((probs >= 0.5) == (labels >= 0.5)).mean())
    return float((probs.argmax(1) == labels).mean())


def auc_score(labels: np.ndarray, probs: np.ndarray) -> float | None:
    # imported here: scikit-learn costs a second of every process's start-up, and only scoring needs it
    from sklearn.metrics import roc_auc_score

    if labels.ndim == 2:
        per = [roc_auc_score(labels[:, j], probs[:, j]) for j in range(labels.shape[1])
               if 0 < labels[:, j].sum() < len(labels)]
        return float(np.mean(per)) if per else None
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        # Ranked by p1 - p0 in float64, not p1: float32 rounds p1 to exactly 1 once the logit gap
        # passes about 17, and those scores tie, while p0 (near 0, where float32 is fine-grained)
        # still orders them.  A site whose model is sure of one class scored 0.5 by p1's ties.
        value = roc_auc_score(labels, probs[:, 1].astype(np.float64) - probs[:, 0].astype(np.float64))
    else:
        if len(present) < probs.shape[1]:
            return None
        value = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    return float(value) if math.isfinite(value) else None
