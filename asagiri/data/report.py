"""``asagiri partition``: each site's sample indices and a statistics report (JSON, Markdown, PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .loaders import VAL_FRACTION, open_dataset, site_indices
from .sources import RawDataset

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = ["LABEL_MIX_NAME", "label_mix", "partition_report", "write_label_mix"]

SPLITS = ("train", "val", "test")


def _label_counts(raw: RawDataset, split: str, idx: np.ndarray) -> list[int]:
    labels = raw.labels[split][idx]
    if raw.task == "multilabel":  # positives per label, then "no finding"
        return [int(x) for x in labels.sum(axis=0)] + [int((labels.sum(axis=1) == 0).sum())]
    return [int(x) for x in np.bincount(labels, minlength=raw.num_outputs)]


def partition_report(
    *, dataset: str, path: Path | None, sites: int, scheme: str, alpha: float, seed: int, out: Path,
    image_size: int = 28, feature_key: str | None = None, val_fraction: float = VAL_FRACTION,
) -> dict[str, Any]:
    raw = open_dataset(dataset, path, image_size=image_size, seed=seed, cache_dir=out / "cache",
                       val_fraction=val_fraction)
    names = list(raw.label_names) + (["no finding"] if raw.task == "multilabel" else [])
    per_site: list[dict[str, Any]] = [{"site_index": i} for i in range(sites)]
    indices: list[dict[str, list[int]]] = [{} for _ in range(sites)]
    for split in SPLITS:
        parts = site_indices(raw, dataset, split, sites, scheme=scheme, alpha=alpha, seed=seed, feature_key=feature_key)
        for i, idx in enumerate(parts):
            indices[i][split] = idx.tolist()
            per_site[i][split] = {"size": int(len(idx)), "labels": dict(zip(names, _label_counts(raw, split, idx), strict=True))}
            if scheme == "feature" and raw.meta.get(split):
                key = feature_key or next(iter(k for k in ("view", "site") if k in raw.meta[split]), None)
                if key:
                    vals, counts = np.unique(raw.meta[split][key][idx], return_counts=True)
                    per_site[i][split][key] = dict(zip(vals.tolist(), counts.tolist(), strict=True))
    out.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(indices):
        (out / f"site-{i + 1}.json").write_text(json.dumps(idx))
    stats = {
        "dataset": dataset, "task": raw.task, "sites": sites, "scheme": scheme, "alpha": alpha, "seed": seed,
        "labels": names, "per_site": per_site,
        "simulated_acquisition_shift": scheme == "feature" and not any(raw.meta.get(s) for s in SPLITS),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    (out / "stats.md").write_text(_markdown(stats))
    _chart(stats, out / "stats.png")
    return stats


def _markdown(stats: dict[str, Any]) -> str:
    names = stats["labels"]
    lines = [
        f"# {stats['dataset']}: {stats['sites']} sites, scheme {stats['scheme']}"
        + (f" (alpha {stats['alpha']})" if stats["scheme"] in ("dirichlet", "quantity") else "")
        + f", seed {stats['seed']}",
        "",
    ]
    if stats["simulated_acquisition_shift"]:
        lines += ["Feature shift is **simulated**: each site's images get its own brightness / contrast / gamma / "
                  "blur profile (asagiri.data.loaders.ACQUISITION_PROFILES).", ""]
    lines += ["| site | train | val | test | " + " | ".join(f"train {n}" for n in names) + " |",
              "|---" * (4 + len(names)) + "|"]
    for s in stats["per_site"]:
        counts = [s["train"]["labels"][n] for n in names]
        lines.append(f"| {s['site_index'] + 1} | {s['train']['size']} | {s['val']['size']} | {s['test']['size']} | "
                     + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines) + "\n"


def _chart(stats: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = stats["labels"]
    sites = [f"site {s['site_index'] + 1}" for s in stats["per_site"]]
    counts = np.array([[s["train"]["labels"][n] for n in names] for s in stats["per_site"]], dtype=float)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    bottom = np.zeros(len(sites))
    cmap = plt.get_cmap("tab20")
    for j, name in enumerate(names):
        ax1.bar(sites, share[:, j], bottom=bottom, label=name, color=cmap(j % 20))
        bottom += share[:, j]
    ax1.set_title("label mix per site (train)")
    ax1.set_ylabel("share of site's labels")
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    sizes = np.array([[s[sp]["size"] for sp in SPLITS] for s in stats["per_site"]])
    x = np.arange(len(sites))
    for k, sp in enumerate(SPLITS):
        ax2.bar(x + (k - 1) * 0.27, sizes[:, k], width=0.27, label=sp)
    ax2.set_xticks(x, sites)
    ax2.set_title("images per site")
    ax2.legend()
    fig.suptitle(f"{stats['dataset']}: {stats['scheme']} partition, seed {stats['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- a simulated run's label mix, for its report ---------------------------------------------------

LABEL_MIX_NAME = "label_mix.json"


def label_mix(data: DataConfig, site_ids: list[int]) -> dict[str, Any]:
    """Each site's training label counts, rebuilt from the run's data config (a simulated federation
    such as ``asagiri demo``, where every site takes its share of one file; a real site's data never
    leaves it): ``{"sites": ids, "counts": [[...] per site]}``, or ``{"unavailable": reason}``."""
    from .loaders import load_configured_site

    try:
        counts = []
        for i in range(len(site_ids)):
            site = load_configured_site(data, path=data.path, site_index=i, num_sites=len(site_ids))
            labels = site.train.labels.numpy()
            counts.append(np.bincount(labels.astype(int).reshape(-1), minlength=2) if labels.ndim == 1
                          else labels.reshape(len(labels), -1).sum(0))
    except Exception as exc:  # noqa: BLE001  (the report is still written; the reason is shown)
        return {"unavailable": f"{type(exc).__name__}: {exc}"}
    return {"sites": list(site_ids), "counts": [[float(x) for x in c] for c in counts]}


def write_label_mix(run_dir: Path, data: DataConfig, site_ids: list[int]) -> dict[str, Any]:
    """Write ``RUN_DIR/label_mix.json`` (what ``observe/report.py`` draws the label mix from) unless
    it already holds the counts; returns what the file holds."""
    path = run_dir / LABEL_MIX_NAME
    if path.exists():
        try:
            held = json.loads(path.read_text())
        except ValueError:
            held = {}
        if isinstance(held, dict) and "counts" in held:
            return held
    mix = label_mix(data, site_ids)
    path.write_text(json.dumps(mix))
    return mix
