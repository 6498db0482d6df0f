"""The attack report: ``attack_report.json`` (every figure and setting), ``attack_report.md`` (the
tables), and one image grid per inversion scenario (originals above reconstructions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .scenarios import InversionResult  # noqa: E402

__all__ = ["save_grid", "write_report"]


def save_grid(result: InversionResult, path: Path) -> None:
    """Originals in the top row, their reconstructions (as matched for scoring) below."""
    n = len(result.originals)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n + 0.4, 3.6), squeeze=False)
    recon = result.reconstructions
    for i in range(n):
        for row, img in ((0, result.originals[i]), (1, recon[result.scores.order[i]])):
            ax = axes[row][i]
            ax.imshow(np.transpose(img, (1, 2, 0)).squeeze(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1][i].set_xlabel(f"SSIM {result.scores.ssim[i]:.2f}" if i < len(result.scores.ssim) else "")
    axes[0][0].set_ylabel("original")
    axes[1][0].set_ylabel("rebuilt")
    fig.suptitle(f"{result.scenario}: {result.observed}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, *, inversions: dict[str, dict[str, Any]], membership: dict[str, dict[str, Any]],
                 settings: dict[str, Any]) -> dict[str, Any]:
    """Write both report files; returns the JSON document."""
    doc = {"settings": settings, "scenarios": inversions, "membership": membership}
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack_report.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    lines = ["# Attack report"]
    if inversions:
        lines += ["", "## Gradient inversion", "",
                  "| scenario | model | observed | SSIM mean | SSIM max | SSIM min | control | PSNR mean | labels | "
                  "alignment |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in inversions.items():
        labels = "—" if r.get("label_accuracy") is None else f"{r['label_accuracy']:.0%}"
        control = r.get("control_mean_image_ssim")
        lines.append(f"| {name} | {r['model']} | {r['observed']} | {r['ssim_mean']:.3f} | {r['ssim_max']:.3f} | "
                     f"{r['ssim_min']:.3f} | {'—' if control is None else f'{control:.3f}'} | {r['psnr_mean']:.1f} | "
                     f"{labels} | {r['alignment']} |")
    if inversions:
        lines += ["", "control: the SSIM of the mean image (an attack that learned nothing) against the same originals."]
    if membership:
        lines += ["", "## Membership inference", "",
                  "| target | attack | AUC | TPR at 1% FPR | TPR at 0.1% FPR | members | train acc. | held-out acc. |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in membership.items():
        for attack in ("loss_threshold", "lira_offline"):
            m = r[attack]
            lines.append(f"| {name} | {attack} | {m['mia_auc']:.3f} | {m['tpr_at_1pct_fpr']:.3f} | "
                         f"{m['tpr_at_0.1pct_fpr']:.3f} | {m['members']} | {r['train_accuracy']:.3f} | "
                         f"{r['heldout_accuracy']:.3f} |")
    lines += ["", "Settings: `" + json.dumps(settings, sort_keys=True) + "`", ""]
    (out / "attack_report.md").write_text("\n".join(lines))
    return doc
