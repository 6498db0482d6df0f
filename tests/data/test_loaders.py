"""Loaders on small fixture files made here, in each format; grouping and partition invariants."""

import csv

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from asagiri.data.loaders import load_site_data, open_dataset, site_indices
from asagiri.data.partition import dirichlet_partition, feature_partition, partition
from asagiri.data.sources import NIH_LABELS


def make_nih(root, patients=30, per_patient=3, official=False):
    rng = np.random.default_rng(0)
    (root / "images_001" / "images").mkdir(parents=True)
    rows = []
    for p in range(patients):
        for k in range(per_patient):
            name = f"{p:08d}_{k:03d}.png"
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / "images_001" / "images" / name)
            findings = "No Finding" if (p + k) % 3 == 0 else "|".join(NIH_LABELS[(p + k) % 14: (p + k) % 14 + 2])
            rows.append({"Image Index": name, "Finding Labels": findings, "Follow-up #": k, "Patient ID": p,
                         "Patient Age": 20 + p, "Patient Gender": "M", "View Position": "PA" if p % 3 else "AP"})
    with open(root / "Data_Entry_2017.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if official:
        test = [r["Image Index"] for r in rows if int(r["Patient ID"]) % 5 == 0]
        (root / "test_list.txt").write_text("\n".join(test))
        (root / "train_val_list.txt").write_text("\n".join(r["Image Index"] for r in rows if r["Image Index"] not in test))
    return rows


def make_isic(root, patients=25, per_patient=4):
    rng = np.random.default_rng(1)
    (root / "jpeg" / "train").mkdir(parents=True)
    rows = []
    for p in range(patients):
        for k in range(per_patient):
            name = f"ISIC_{p:04d}{k:03d}"
            Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(root / "jpeg" / "train" / f"{name}.jpg")
            rows.append({"image_name": name, "patient_id": f"IP_{p}", "sex": "female", "age_approx": 40,
                         "anatom_site_general_challenge": ["torso", "head/neck", "lower extremity", ""][p % 4],
                         "target": int((p + k) % 7 == 0)})
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def test_nih_loader_multilabel_targets_and_patient_grouping(tmp_path):
    make_nih(tmp_path)
    raw = open_dataset("nih", tmp_path, image_size=32, cache_dir=tmp_path / "cache")
    assert raw.task == "multilabel" and raw.num_outputs == 14 and raw.channels == 1
    assert raw.images["train"].shape[1:] == (32, 32)
    patients = {s: set(raw.meta[s]["patient"].tolist()) for s in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    assert sum(len(raw.labels[s]) for s in patients) == 90
    # "No Finding" rows are all zero; others have their findings set
    all_labels = np.concatenate([raw.labels[s] for s in ("train", "val", "test")])
    assert (all_labels.sum(axis=1) == 0).sum() == 30
    # cached decode gives the same arrays
    again = open_dataset("nih", tmp_path, image_size=32, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.images["train"][:], raw.images["train"][:])


def test_nih_official_test_list_is_respected(tmp_path):
    rows = make_nih(tmp_path, official=True)
    raw = open_dataset("nih", tmp_path, image_size=16)
    want = {int(r["Patient ID"]) for r in rows if int(r["Patient ID"]) % 5 == 0}
    assert {int(p) for p in raw.meta["test"]["patient"]} == want
    assert raw.official_test


def test_isic_loader_binary_rgb_grouped(tmp_path):
    rows = make_isic(tmp_path)
    raw = open_dataset("isic", tmp_path, image_size=24, cache_dir=tmp_path / "c")
    assert raw.task == "binary" and raw.channels == 3 and raw.images["train"].shape[1:] == (24, 24, 3)
    seen = [set(raw.meta[s]["patient"].tolist()) for s in ("train", "val", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert sum(map(len, seen)) == 25 and sum(len(raw.labels[s]) for s in ("train", "val", "test")) == len(rows)
    assert "unknown" in set(np.concatenate([raw.meta[s]["site"] for s in ("train", "val", "test")]))


@pytest.mark.parametrize("dataset", ["isic", "nih"])
def test_val_fraction_sets_the_validation_share_of_patients(tmp_path, dataset):
    (make_isic if dataset == "isic" else make_nih)(tmp_path, patients=200, per_patient=1)
    shares = []
    for fraction in (0.1, 0.4):
        raw = open_dataset(dataset, tmp_path, image_size=8, val_fraction=fraction)
        shares.append(len(raw.labels["val"]) / 200)
        patients = [set(raw.meta[s]["patient"].tolist()) for s in ("train", "val", "test")]
        assert not (patients[0] & patients[1] or patients[1] & patients[2])
    assert shares[0] == pytest.approx(0.1, abs=0.06) and shares[1] == pytest.approx(0.4, abs=0.08)


def test_medmnist_any_task(tmp_path):
    rng = np.random.default_rng(2)
    for name, labels in {
        "multi": lambda n: rng.integers(0, 5, (n, 1)),
        "ml": lambda n: rng.integers(0, 2, (n, 4)),
    }.items():
        arrays = {}
        for s, n in (("train", 40), ("val", 10), ("test", 10)):
            arrays[f"{s}_images"] = rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)
            arrays[f"{s}_labels"] = labels(n).astype(np.uint8)
        np.savez(tmp_path / f"{name}.npz", **arrays)
        raw = open_dataset("medmnist", tmp_path / f"{name}.npz", image_size=28)
        assert raw.images["train"].shape == (40, 28, 28, 3)
        assert (raw.task, raw.num_outputs) == (("multiclass", 5) if name == "multi" else ("multilabel", 4))
        site = load_site_data(dataset="medmnist", path=tmp_path / f"{name}.npz", site_index=0, num_sites=2,
                              scheme="dirichlet", alpha=1.0, seed=0)
        assert site.train.images.shape[1] == 3 and float(site.train.images.max()) <= 1.0


def test_bundled_sets_load():
    pn = open_dataset("pneumoniamnist", None)
    assert (len(pn.labels["train"]), len(pn.labels["val"]), len(pn.labels["test"])) == (4708, 524, 624)
    dm = open_dataset("dermamnist", None)
    assert (len(dm.labels["train"]), len(dm.labels["val"]), len(dm.labels["test"])) == (7007, 1003, 2005)
    assert np.bincount(dm.labels["train"]).tolist() == [228, 359, 769, 80, 779, 4693, 99]


@settings(max_examples=40, deadline=None)
@given(st.integers(20, 400), st.integers(2, 8), st.sampled_from(["iid", "dirichlet", "quantity"]),
       st.floats(0.1, 5.0), st.integers(0, 1000))
def test_partitions_cover_every_sample_once_and_are_deterministic(n, sites, scheme, alpha, seed):
    labels = np.random.default_rng(seed).integers(0, 4, n)
    parts = partition(labels, sites, scheme=scheme, alpha=alpha, seed=seed)
    together = np.concatenate(parts)
    assert len(parts) == sites and np.array_equal(np.sort(together), np.arange(n))
    again = partition(labels, sites, scheme=scheme, alpha=alpha, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_feature_partition_groups_by_value():
    values = np.array(["PA"] * 60 + ["AP"] * 30 + ["LL"] * 10)
    parts = feature_partition(values, 2, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert set(values[parts[0]]) == {"PA"}  # the largest group fills the first site


def test_feature_scheme_on_nih_splits_view_positions(tmp_path):
    make_nih(tmp_path)
    raw = open_dataset("nih", tmp_path, image_size=16)
    parts = site_indices(raw, "nih", "train", 2, scheme="feature", alpha=0.3, seed=0)
    views = [set(raw.meta["train"]["view"][p].tolist()) for p in parts]
    assert views[0] != views[1]


def test_simulated_acquisition_shift_changes_site_images():
    a = load_site_data(dataset="synthetic", path=None, site_index=0, num_sites=4, scheme="feature", alpha=1, seed=0)
    b = load_site_data(dataset="synthetic", path=None, site_index=1, num_sites=4, scheme="feature", alpha=1, seed=0)
    assert abs(float(a.train.images.mean()) - float(b.train.images.mean())) > 0.05


def test_dirichlet_skews_labels():
    labels = np.repeat(np.arange(2), 500)
    parts = dirichlet_partition(labels, 4, 0.3, rng=np.random.default_rng(0))
    shares = [np.bincount(labels[p], minlength=2) / len(p) for p in parts]
    assert max(s[1] for s in shares) - min(s[1] for s in shares) > 0.3


def test_held_out_splits_follow_each_sites_training_label_mix():
    raw = open_dataset("pneumoniamnist", None)
    kw = dict(scheme="dirichlet", alpha=0.3, seed=0)
    train = site_indices(raw, "pneumoniamnist", "train", 4, **kw)
    assert [len(p) for p in train] == [3363, 836, 80, 429]  # the split of docs/results.md, unchanged
    share = lambda p, sp: raw.labels[sp][p].reshape(-1).mean()  # noqa: E731
    for split, follows in (("val", False), ("test", True)):
        parts = site_indices(raw, "pneumoniamnist", split, 4, test_follows_site=follows, **kw)
        together = np.concatenate(parts)
        assert np.array_equal(np.sort(together), np.arange(len(raw.labels[split])))
        for tr, held in zip(train, parts, strict=True):
            assert abs(share(tr, "train") - share(held, split)) < 0.07
    # By default the official test split is shared out evenly, each share with the population's mix.
    even = site_indices(raw, "pneumoniamnist", "test", 4, **kw)
    assert max(len(p) for p in even) - min(len(p) for p in even) <= 1
    assert all(abs(share(p, "test") - share(np.arange(624), "test")) < 0.1 for p in even)


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Data_Entry_2017.csv"):
        open_dataset("nih", tmp_path)
    with pytest.raises(FileNotFoundError, match="train.csv"):
        open_dataset("isic", tmp_path)
    with pytest.raises(ValueError, match="needs data.path"):
        open_dataset("medmnist", None)


def test_partition_cli_writes_indices_and_report(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "part"
    proc = subprocess.run([sys.executable, "-m", "asagiri.cli.main", "partition", "--dataset", "pneumoniamnist",
                           "--sites", "3", "--scheme", "dirichlet", "--alpha", "0.3", "--seed", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    train = [json.loads((out / f"site-{i}.json").read_text())["train"] for i in (1, 2, 3)]
    assert sorted(sum(train, [])) == list(range(4708))
    assert [s["train"]["size"] for s in stats["per_site"]] == [len(t) for t in train]
    assert "| site | train | val | test |" in (out / "stats.md").read_text()
    assert (out / "stats.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity"])
def test_a_small_file_is_never_split_into_a_site_the_default_policy_refuses(tmp_path, scheme):
    """A 550-image cohort in 3 skewed shares: before, half the seeds gave a site 18 to 29 training
    images, and its default policy (min_examples 32) refused every round; the demo ended refused."""
    from asagiri.config.site import PolicyConfig

    floor = PolicyConfig().min_examples
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 550), ("val", 78), ("test", 100)):
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = (rng.random((n, 1)) < 0.74).astype(np.uint8)
    np.savez(tmp_path / "small.npz", **arrays)
    raw = open_dataset("medmnist", tmp_path / "small.npz")
    unfloored = []
    for seed in range(8):
        sizes = [len(p) for p in site_indices(raw, "medmnist", "train", 3, scheme=scheme, alpha=0.3, seed=seed)]
        assert sum(sizes) == 550 and min(sizes) >= floor, (seed, sizes)
        unfloored.append(min(len(p) for p in partition(raw.labels["train"], 3, scheme=scheme, alpha=0.3, seed=seed,
                                                       min_size=1 if scheme == "quantity" else 10)))
    assert min(unfloored) < floor  # the draws this guards against happen at these seeds


def test_quantity_partition_without_a_floor_draws_as_before():
    from asagiri.data.partition import quantity_partition

    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    props = rng_b.dirichlet(np.full(4, 0.5))
    sizes = 1 + np.floor(props * (300 - 4)).astype(int)
    sizes[np.argmax(sizes)] += 300 - sizes.sum()
    assert [len(p) for p in quantity_partition(300, 4, 0.5, rng=rng_a)] == sizes.tolist()
