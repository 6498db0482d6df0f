"""``asagiri report RUN_DIR``: one self-contained ``report.html`` (plots embedded) and the PNGs.

Everything comes from the run directory: ``metrics.jsonl`` (per-round AUC, epsilon, stage times,
participation), ``audit.jsonl`` (aborted attempts), ``summary.json``, ``config/fed.yaml`` (the
privacy budget and the sites), ``label_mix.json`` (each site's training label counts, which
``asagiri report`` writes from the data split of a simulated run: ``data.report.write_label_mix``),
and any ``attack_report.json`` under it.  Nothing here opens a data set.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

if TYPE_CHECKING:
    from ..config import FederationConfig

LABEL_MIX_NAME = "label_mix.json"  # data.report.LABEL_MIX_NAME
__all__ = ["write_report"]

# Participation grid: one colour per state of a site in a round.
STATES = ("not selected", "contributed", "declined", "dropped")
STATE_COLOURS = ("#e8e8e8", "#4c9a5b", "#e0a03a", "#c8453c")


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, color="#555", wrap=True,
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _auc(records: list[dict[str, Any]]) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    rounds = [r["round"] for r in records]
    sites = sorted({s for r in records for s in r.get("site_auc", {})}, key=int)
    for site in sites:
        ax.plot(rounds, [r.get("site_auc", {}).get(site, np.nan) for r in records], marker=".", alpha=0.6,
                label=f"site {site}")
    if any(r.get("auc") is not None for r in records):
        ax.plot(rounds, [r.get("auc", np.nan) for r in records], color="black", lw=2.2, marker="o", label="global")
    else:
        _note(ax, "no validation AUC was reported")
    if undefined := sorted({s for r in records for s in r.get("site_auc_undefined", [])}):
        ax.annotate(f"no AUC from sites {undefined}: their validation split holds one class (or lacks one); "
                    "the global AUC leaves them out", (0.01, 0.02), xycoords="axes fraction", fontsize=7, color="#a33")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation AUC")
    ax.set_title("AUC per site and global, per round")
    if sites or rounds:
        ax.legend(fontsize=7, ncol=3)
    return fig


def _epsilon(records: list[dict[str, Any]], budget: float | None) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sites = sorted({s for r in records for s in r.get("epsilon", {})}, key=int)
    if not sites:
        _note(ax, "no site reported epsilon (DP off, or the sites' policy.report_privacy is false)")
    for site in sites:
        ax.plot([r["round"] for r in records], [r.get("epsilon", {}).get(site, np.nan) for r in records],
                marker="o", label=f"site {site}")
    if sites and budget is not None:
        ax.axhline(budget, color="#c8453c", ls="--", label=f"budget ε = {budget:g}")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ε spent")
    ax.set_title("Privacy spent per site, per round")
    if sites:
        ax.legend(fontsize=7)
    return fig


def _stages(records: list[dict[str, Any]]) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    stages = list(dict.fromkeys(s for r in records for s in r.get("stage_s", {})))
    if not stages:
        _note(ax, "no stage times recorded")
    bottom = np.zeros(len(records))
    rounds = [r["round"] for r in records]
    for stage in stages:
        values = np.array([r.get("stage_s", {}).get(stage, 0.0) for r in records])
        ax.bar(rounds, values, bottom=bottom, label=stage)
        bottom += values
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("seconds")
    ax.set_title("Round time by stage")
    if stages:
        ax.legend(fontsize=7, ncol=2)
    return fig


def _participation(records: list[dict[str, Any]], audit: list[dict[str, Any]], sites: list[int]) -> Figure:
    """A site x round-attempt grid: contributed, declined, dropped, or not selected."""
    attempts = [(a["round"], a["attempt"], a) for a in audit if a.get("kind") in ("round_completed", "round_aborted")]
    if not attempts:  # an older run without these audit records: the completed rounds only
        attempts = [(r["round"], r["attempt"], r) for r in records]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(attempts) + 2), max(2.4, 0.35 * len(sites) + 1.4)))
    if not attempts or not sites:
        _note(ax, "no round was attempted")
        ax.set_title("Participation per round")
        return fig
    grid = np.zeros((len(sites), len(attempts)), dtype=int)
    for j, (_, _, rec) in enumerate(attempts):
        for i, site in enumerate(sites):
            if site in rec.get("participants", []):
                grid[i, j] = 1
            elif str(site) in rec.get("declined", {}):
                grid[i, j] = 2
            elif site in rec.get("dropped", []):
                grid[i, j] = 3
    ax.imshow(grid, cmap=ListedColormap(STATE_COLOURS), vmin=0, vmax=len(STATES) - 1, aspect="auto")
    ax.set_xticks(range(len(attempts)), [f"{r}" if a == 1 else f"{r}.{a}" for r, a, _ in attempts], fontsize=7)
    ax.set_yticks(range(len(sites)), [f"site {s}" for s in sites], fontsize=7)
    ax.set_xlabel("round (.attempt)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in STATE_COLOURS]
    ax.legend(handles, STATES, fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    ax.set_title("Participation and dropouts per round")
    return fig


def _label_mix(cfg: FederationConfig | None, run_dir: Path) -> tuple[Figure, str]:
    """Each site's training label mix, as ``label_mix.json`` records it (a simulated federation such
    as ``asagiri demo``, whose split ``asagiri report`` rebuilds; a real site's data never leaves it)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.set_title("Training label mix per site")
    if cfg is None:
        _note(ax, "label mix unavailable: the run has no config/fed.yaml")
        return fig, "unavailable"
    path = run_dir / LABEL_MIX_NAME
    mix = json.loads(path.read_text()) if path.exists() else {
        "unavailable": f"FileNotFoundError: no {LABEL_MIX_NAME} in the run (`asagiri report` writes it)"}
    if "counts" not in mix:
        _note(ax, f"label mix unavailable: {mix.get('unavailable')}"[:200])
        return fig, "unavailable"
    counts = [np.asarray(c, dtype=float) for c in mix["counts"]]
    width = max(len(c) for c in counts)
    table = np.array([np.pad(c, (0, width - len(c))) for c in counts], dtype=float)
    bottom = np.zeros(len(counts))
    for k in range(width):
        ax.bar([f"site {s}" for s in mix["sites"]], table[:, k], bottom=bottom, label=f"class {k}")
        bottom += table[:, k]
    ax.set_ylabel("training images")
    ax.legend(fontsize=7, ncol=min(width, 5))
    return fig, f"{int(table.sum())} training images over {len(counts)} sites"


def _attacks(run_dir: Path) -> tuple[Figure, str] | None:
    reports = sorted(run_dir.glob("**/attack_report.json"))
    if not reports:
        return None
    rows, names, ssim = [], [], []
    for path in reports:
        doc = json.loads(path.read_text())
        for name, r in doc.get("scenarios", {}).items():
            names.append(name)
            ssim.append(r["ssim_mean"])
            rows.append(f"<tr><td>{html.escape(name)}</td><td>SSIM {r['ssim_mean']:.3f} (best {r['ssim_max']:.3f})"
                        f"</td><td>{html.escape(str(path.relative_to(run_dir)))}</td></tr>")
        for name, r in doc.get("membership", {}).items():
            m = r["lira_offline"]
            rows.append(f"<tr><td>{html.escape(name)}</td><td>LiRA AUC {m['mia_auc']:.3f}, TPR {m['tpr_at_1pct_fpr']:.3f}"
                        f" at 1% FPR</td><td>{html.escape(str(path.relative_to(run_dir)))}</td></tr>")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if names:
        ax.barh(names, ssim, color="#5b7fb3")
        ax.set_xlabel("SSIM of the reconstruction (mean over images)")
        ax.set_xlim(0, 1)
    else:
        _note(ax, "membership inference only: see the table")
    ax.set_title("Attacks on this run")
    return fig, "<table><tr><th>attack</th><th>result</th><th>file</th></tr>" + "".join(rows) + "</table>"


def _png(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default ``RUN_DIR/report``)/report.html and one PNG per plot; returns the
    HTML's path.  Raises FileNotFoundError when ``run_dir`` holds no run."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").exists() and not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir}: no run here (no summary.json or metrics.jsonl)")
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = _records(run_dir / "metrics.jsonl")
    audit = _records(run_dir / "audit.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    budget, sites = None, sorted({s for r in records for s in r.get("selected", [])})
    fed = run_dir / "config" / "fed.yaml"
    cfg = None
    if fed.exists():
        from ..config import load_federation

        cfg = load_federation(fed)
        budget = cfg.dp.target_epsilon if cfg.dp.enabled else None
        sites = [s.id for s in cfg.sites]
    label_fig, label_note = _label_mix(cfg, run_dir)
    plots = [
        ("auc", "AUC per site and global, per round", _auc(records), ""),
        ("epsilon", "Privacy spent per site, against the budget", _epsilon(records, budget), ""),
        ("stages", "Round time by stage", _stages(records), ""),
        ("participation", "Participation and dropouts", _participation(records, audit, sites), ""),
        ("label_mix", "Partition: label mix per site", label_fig, label_note),
    ]
    attacks = _attacks(run_dir)
    if attacks is not None:
        plots.append(("attacks", "Attacks on this run", attacks[0], attacks[1]))
    figures = []
    for name, title, fig, extra in plots:
        data = _png(fig, out / f"{name}.png")
        note = extra if extra.startswith("<table") else html.escape(extra)
        figures.append(f'<figure id="{name}"><h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
                       f'src="data:image/png;base64,{data}"><figcaption>{note}</figcaption></figure>')
    facts = {k: summary.get(k) for k in ("run_id", "status", "rounds_completed", "rounds_planned", "test_auc",
                                         "test_accuracy", "test_auc_site_mean", "mean_round_s", "model_sha256")
             if k in summary}
    if summary.get("personalised"):  # FedBN: each site's own model first, the pool labelled as what it is
        facts = {("test_auc (pooled over the sites' own models, each on its own scale)" if k == "test_auc" else k): v
                 for k, v in facts.items()}
        facts["test_site_auc (each site's own FedBN model on its own test share)"] = summary.get("test_site_auc")
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Asagiri run {html.escape(str(facts.get('run_id', run_dir.name)))}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ text-align: left; padding: 0.2em 0.8em; }}
figure {{ margin: 2em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
</style></head>
<body><h1>Asagiri run report</h1>
<table>{rows}</table>
{''.join(figures)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
