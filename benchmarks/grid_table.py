"""Markdown tables, mean ± sd over seeds, from the JSON lines of ``benchmarks/experiments.py``.

    python benchmarks/grid_table.py benchmarks/results/grid-*.jsonl

One table per data set (a file given by ``--path`` is named by its file), rows the methods, columns
the partitions; each cell is the test AUC's mean ± sample sd over the seeds that completed, and
``n=`` where fewer than the most seeds completed.  ``--metric`` picks another field.
``--per-site``: one row per seed and site instead, each method's AUC of that site's own model on
its own test share (``test_site_auc``), for personalised models (FedBN) against local training.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def data_name(row: dict) -> str:
    return Path(row["path"]).stem if row.get("path") else row["dataset"]


def cell(values: list[float], most: int) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    out = f"{statistics.fmean(values):.3f} ± {sd:.3f}"
    return out if len(values) == most else f"{out} (n={len(values)})"


def tables(rows: list[dict], metric: str) -> str:
    grid: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    schemes: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        name, scheme = data_name(r), r["scheme"]
        if scheme not in schemes[name]:
            schemes[name].append(scheme)
        if r.get("status") == "completed" and r.get(metric) is not None:
            grid[name][r["method"]][scheme].append(float(r[metric]))
    out = []
    for name, methods in grid.items():
        most = max(len(v) for by_scheme in methods.values() for v in by_scheme.values())
        out += [f"**{name}**, {metric} (mean ± sd over {most} seeds)", "",
                "| method | " + " | ".join(schemes[name]) + " |", "| --- |" + " ---: |" * len(schemes[name])]
        for method, by_scheme in methods.items():
            out.append(f"| {method} | " + " | ".join(cell(by_scheme.get(s, []), most) for s in schemes[name]) + " |")
        out.append("")
    return "\n".join(out)


def per_site(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells: dict[tuple[int, str], dict[str, float]] = defaultdict(dict)
    for r in rows:
        for site, auc in (r.get("test_site_auc") or {}).items():
            cells[(r["seed"], site)][r["method"]] = auc
    out = ["| seed | site | " + " | ".join(methods) + " |", "| ---: | ---: |" + " ---: |" * len(methods)]
    for (seed, site), by_method in sorted(cells.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        out.append(f"| {seed} | {site} | " + " | ".join(f"{by_method[m]:.3f}" if m in by_method else "–"
                                                        for m in methods) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--metric", default="test_auc")
    p.add_argument("--per-site", action="store_true")
    args = p.parse_args()
    rows = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.strip()]
    print(per_site(rows) if args.per_site else tables(rows, args.metric))


if __name__ == "__main__":
    main()
