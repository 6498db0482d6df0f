"""The AUC every report and summary uses (``asagiri.scores.auc_score``), against its definitions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from asagiri.scores import auc_score


def test_multi_class_auc_is_the_mean_of_one_vs_rest_aucs():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), 30)
    logits = rng.normal(size=(len(labels), 7)) + 1.5 * np.eye(7)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    by_hand = np.mean([roc_auc_score(labels == j, probs[:, j]) for j in range(7)])
    assert auc_score(labels, probs) == pytest.approx(by_hand, abs=1e-12)


def test_binary_auc_reads_the_positive_column_and_one_class_has_none():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.65, 0.35], [0.2, 0.8]])
    assert auc_score(labels, probs) == 0.75
    assert auc_score(np.zeros(4, int), probs) is None


def test_binary_auc_orders_scores_that_float32_rounds_to_one():
    """A model sure of the positive class everywhere (logit gaps 10-30, as a one-class FedBN site's
    were: 10.8-17.7) still orders its examples; float32 rounds most p1 to exactly 1.0, and ranking by
    p1 alone ties them.  The AUC must be the logits' own."""
    import torch

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    gap = 10 + 20 * rng.random(400) + 3 * labels  # positives a little further out
    logits = torch.from_numpy(np.stack([np.zeros(400), gap], 1)).float()
    probs = torch.softmax(logits, dim=1).numpy()
    truth = roc_auc_score(labels, gap)
    by_p1 = roc_auc_score(labels, probs[:, 1])
    assert len(np.unique(probs[:, 1])) < 50 and by_p1 < truth - 0.05  # the ties this guards against
    assert auc_score(labels, probs) == pytest.approx(truth, abs=1e-12)
