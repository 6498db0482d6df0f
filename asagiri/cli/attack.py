"""``asagiri attack invert|mia|all``: measure what the coordinator could learn (docs/security.md)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .common import EXIT_CONFIG, EXIT_OK

__all__ = ["add_parser", "run_attack"]

MIA_TARGETS = {
    # name: (which site, private, scheme, sites, model).  The label-skew split's smallest site (80
    # images, all one class) and largest (3363); and an 81-image IID share with both classes, where a
    # CNN trained long on it has something to memorise.
    "smallest_site": ("smallest", False, "dirichlet", 4, "scatter_linear"),
    "smallest_site_dp": ("smallest", True, "dirichlet", 4, "scatter_linear"),
    "largest_site": ("largest", False, "dirichlet", 4, "scatter_linear"),
    "largest_site_dp": ("largest", True, "dirichlet", 4, "scatter_linear"),
    "small_iid_site": ("smallest", False, "iid", 58, "small_cnn"),
    "small_iid_site_dp": ("smallest", True, "iid", 58, "small_cnn"),
}


def add_parser(sub: Any) -> None:
    a = sub.add_parser("attack", help="gradient inversion and membership inference against the product's models")
    a.add_argument("what", choices=["invert", "mia", "all"])
    a.add_argument("--scenario", action="append", default=[], help="invert: a scenario (repeatable; default: all)")
    a.add_argument("--target", action="append", default=[], help="mia: a target (repeatable; default: all)")
    a.add_argument("--out", type=Path, required=True, help="folder for the report and the image grids")
    a.add_argument("--run", type=Path, default=None,
                   help="invert: attack what this run's coordinator held (a run with keep_models: true)")
    a.add_argument("--round", type=int, default=1, help="--run: the round whose aggregate is attacked")
    a.add_argument("--dataset", default="pneumoniamnist", help="a bundled data set (the runtime's data.dataset)")
    a.add_argument("--norm", default="batch", choices=["batch", "group"], help="small_cnn's normalisation")
    a.add_argument("--width", type=int, default=32)
    a.add_argument("--images", type=int, default=4, help="images behind a multi-image observation")
    a.add_argument("--iterations", type=int, default=1000, help="attack iterations per restart")
    a.add_argument("--restarts", type=int, default=2)
    a.add_argument("--epsilon", type=float, default=8.0)
    a.add_argument("--mia-model", default=None, choices=["small_cnn", "scatter_linear"],
                   help="one model for every membership target (default: each target's own)")
    a.add_argument("--mia-epochs", type=int, default=30)
    a.add_argument("--references", type=int, default=4, help="reference models for offline LiRA")
    a.add_argument("--seed", type=int, default=0)


def run_attack(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from ..attacks.mia import MiaSettings, site_model_attack
    from ..attacks.report import save_grid, write_report
    from ..attacks.scenarios import SCENARIOS, Settings, recorded_round, run_scenario
    from ..data import load_site_data

    if args.run is not None:
        from ..observe.recorder import model_path

        if args.what != "invert" or not model_path(args.run, args.round).exists():
            print(f"error: --run needs `invert` and a run that kept its models (keep_models: true): no "
                  f"{model_path(args.run, args.round)}", file=sys.stderr)
            return EXIT_CONFIG
    scenarios = args.scenario or (list(SCENARIOS) if args.what in ("invert", "all") and args.run is None else [])
    targets = args.target or (list(MIA_TARGETS) if args.what in ("mia", "all") else [])
    unknown = [s for s in scenarios if s not in SCENARIOS] + [t for t in targets if t not in MIA_TARGETS]
    if unknown:
        print(f"error: unknown scenario or target {unknown}; scenarios: {', '.join(SCENARIOS)}; "
              f"targets: {', '.join(MIA_TARGETS)}", file=sys.stderr)
        return EXIT_CONFIG
    settings = Settings(norm=args.norm, width=args.width, images=args.images, iterations=args.iterations,
                        restarts=args.restarts, epsilon=args.epsilon, seed=args.seed)
    # The images attacked: the first of site 1's official test share (never trained on by anything here).
    data = load_site_data(dataset=args.dataset, path=None, site_index=0, num_sites=4, scheme="iid", alpha=1.0,
                          seed=args.seed).test
    inversions: dict[str, dict[str, Any]] = {}
    membership: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    with Progress(transient=True) as progress:
        task = progress.add_task("attacks", total=len(scenarios) + len(targets))
        for name in scenarios:
            progress.update(task, description=f"invert {name}")
            result = run_scenario(name, data, settings)
            save_grid(result, args.out / f"{name}.png")
            inversions[name] = result.summary()
            progress.advance(task)
        if args.run is not None:
            progress.update(task, description=f"invert round {args.round} of {args.run}")
            result = recorded_round(args.run, args.round, settings)
            save_grid(result, args.out / "recorded.png")
            inversions["recorded"] = result.summary()
        for name in targets:
            progress.update(task, description=f"mia {name}")
            which, private, scheme, sites, model = MIA_TARGETS[name]
            model = args.mia_model or model
            # The 81-image share trains 4x as long: the overfit case the attack should find.
            epochs = args.mia_epochs * (4 if scheme == "iid" else 1)
            mia = MiaSettings(dataset=args.dataset, model=model, scheme=scheme, sites=sites,
                              epochs=epochs, references=args.references, epsilon=args.epsilon,
                              lr=0.001 if model == "small_cnn" else 0.01,
                              optimizer="adam" if model == "small_cnn" else "sgd", seed=args.seed)
            membership[name] = {**site_model_attack(mia, which=which, private=private), "scheme": scheme,
                                "settings": asdict(mia)}
            progress.advance(task)
    doc = write_report(args.out, inversions=inversions, membership=membership,
                       settings={"inversion": asdict(settings), "dataset": args.dataset,
                                 "wall_s": round(time.perf_counter() - t0, 1)})
    print((args.out / "attack_report.md").read_text())
    print(f"wrote {args.out / 'attack_report.json'}, attack_report.md and {len(doc['scenarios'])} image grids")
    return EXIT_OK
