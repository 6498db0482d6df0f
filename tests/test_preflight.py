"""``asagiri check``'s look at a site's data (``preflight.data_summary``) and the loader's check of
a named data set's classes: mistakes a newcomer made, each found before the run, in one line."""

from __future__ import annotations

import numpy as np
import pytest

from asagiri.data.loaders import open_dataset
from asagiri.preflight import data_summary


def medmnist(path, classes: int = 2, drop: str | None = None, n: int = 12):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).reshape(-1, 1)
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)
    return path


def test_a_medmnist_file_is_summarised_with_its_counts(tmp_path):
    summary, problem = data_summary(medmnist(tmp_path / "ok.npz"))
    assert problem is None and "12 train, 12 val, 12 test" in summary


@pytest.mark.parametrize(("make", "why"), [
    (lambda p: medmnist(p, drop="train_images"), "is not a MedMNIST file: it lacks train_images"),
    (lambda p: (p.write_text("patient,label\n1,0\n"), p)[1], "is not an .npz file"),
    (lambda p: (p.write_bytes(b"PK\x03\x04 not really"), p)[1], "is not an .npz file"),
])
def test_a_file_of_the_wrong_kind_is_one_line_naming_it(tmp_path, make, why):
    path = make(tmp_path / "data.npz")
    summary, problem = data_summary(path)
    assert summary is None and why in problem and "allow_pickle" not in problem, problem


def test_a_named_data_set_sizes_the_model_by_its_classes_not_by_one_sites_labels(tmp_path):
    """Three classes under pneumoniamnist (two) is refused at set-up, naming the fix; a DermaMNIST
    file lacking its rarest class still gets a seven-way model, as every other site's."""
    with pytest.raises(ValueError, match="labels are of 3 classes .* pneumoniamnist has 2"):
        open_dataset("pneumoniamnist", medmnist(tmp_path / "three.npz", classes=3))
    rng = np.random.default_rng(1)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (12, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(12) % 6).reshape(-1, 1)  # no class 6
    np.savez(tmp_path / "derma.npz", **arrays)
    raw = open_dataset("dermamnist", tmp_path / "derma.npz")
    assert raw.num_outputs == 7 and raw.task == "multiclass"
