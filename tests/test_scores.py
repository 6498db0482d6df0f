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
