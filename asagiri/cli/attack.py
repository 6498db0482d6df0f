"""``asagiri attack invert|mia|all``: measure what the coordinator could learn (docs/security.md)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..attacks.settings import Settings
from ..config import FederationConfig
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
    a.add_argument("--config", type=Path, default=None,
                   help="a federation config: its data, model, training and DP settings (default: the defaults)")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted path, as the runtime takes it (repeatable)")
    a.add_argument("--run", type=Path, default=None,
                   help="attack what this run's coordinator held: invert a round's aggregate (needs keep_models: "
                        "true), or mia the global model")
    a.add_argument("--round", type=int, default=None,
                   help="--run: the round (invert: default 1; mia: default the last completed)")
    a.add_argument("--norm", default=Settings.norm, choices=["batch", "group"],
                   help="small_cnn's normalisation in the inversion matrix (default group, what every DP site "
                        "trains; single_batchnorm measures BatchNorm)")
    a.add_argument("--images", type=int, default=Settings.images,
                   help="images attacked one by one, and behind a multi-image observation")
    a.add_argument("--iterations", type=int, default=Settings.iterations, help="attack iterations per restart")
    a.add_argument("--restarts", type=int, default=Settings.restarts)
    a.add_argument("--feature-iterations", type=int, default=Settings.feature_iterations,
                   help="scatter_single: iterations inverting the ScatterNet transform")
    a.add_argument("--mia-model", default=None, choices=["small_cnn", "scatter_linear"],
                   help="one model for every membership target (default: each target's own)")
    a.add_argument("--mia-epochs", type=int, default=30)
    a.add_argument("--references", type=int, default=4, help="reference models for offline LiRA")
    a.add_argument("--seed", type=int, default=0)


def _config(args: argparse.Namespace) -> FederationConfig:
    from ..config import default_federation, load_federation
    from ..coordinator.checks import check_federation

    if args.config:
        cfg = load_federation(args.config, args.overrides)
        check_federation(cfg, Path(args.config).name)
    else:
        cfg = default_federation(args.overrides)
        check_federation(cfg, "--set")
    return cfg


def run_attack(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from ..attacks.recorded import RunError, global_model_attack, recorded_round
    from ..attacks.report import save_grid, write_report
    from ..attacks.scenarios import SCENARIOS, run_scenario
    from ..data import load_configured_site

    cfg = _config(args)
    run_scenarios = args.run is None and args.what in ("invert", "all")
    scenarios = args.scenario or (list(SCENARIOS) if run_scenarios else [])
    targets = args.target or (list(MIA_TARGETS) if args.what in ("mia", "all") and args.run is None else [])
    unknown = [s for s in scenarios if s not in SCENARIOS] + [t for t in targets if t not in MIA_TARGETS]
    if unknown:
        print(f"error: unknown scenario or target {unknown}; scenarios: {', '.join(SCENARIOS)}; "
              f"targets: {', '.join(MIA_TARGETS)}", file=sys.stderr)
        return EXIT_CONFIG
    if args.run is not None and args.what == "all":
        print("error: --run goes with `invert` (a round's aggregate) or `mia` (the global model)", file=sys.stderr)
        return EXIT_CONFIG
    settings = Settings.from_config(cfg, norm=args.norm, images=args.images, iterations=args.iterations,
                                    restarts=args.restarts, feature_iterations=args.feature_iterations,
                                    seed=args.seed)
    # The images attacked: the first of site 1's test share of an IID split (never trained on by
    # anything here).
    data = load_configured_site(cfg.data.model_copy(update={"partition": cfg.data.partition.model_copy(
        update={"scheme": "iid"})}), path=cfg.data.path, site_index=0, num_sites=4).test
    inversions: dict[str, dict[str, Any]] = {}
    membership: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("attacks", total=len(scenarios) + len(targets) + (args.run is not None))
            for name in scenarios:
                progress.update(task, description=f"invert {name}")
                result = run_scenario(name, data, settings)
                save_grid(result, args.out / f"{name}.png")
                inversions[name] = result.summary()
                progress.advance(task)
            if args.run is not None and args.what == "invert":
                rnd = args.round or 1
                progress.update(task, description=f"invert round {rnd} of {args.run}")
                result = recorded_round(args.run, rnd, settings)
                save_grid(result, args.out / "recorded.png")
                inversions["recorded"] = result.summary()
                progress.advance(task)
            if args.run is not None and args.what == "mia":
                progress.update(task, description=f"mia: the global model of {args.run}")
                membership.update(global_model_attack(args.run, args.round, references=args.references,
                                                      seed=args.seed))
                progress.advance(task)
            for name in targets:
                progress.update(task, description=f"mia {name}")
                membership[name] = _site_target(name, cfg, args)
                progress.advance(task)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    doc = write_report(args.out, inversions=inversions, membership=membership,
                       settings={"inversion": asdict(settings), "data": cfg.data.model_dump(mode="json"),
                                 "run": str(args.run) if args.run else None,
                                 "wall_s": round(time.perf_counter() - t0, 1)})
    print((args.out / "attack_report.md").read_text())
    print(f"wrote {args.out / 'attack_report.json'}, attack_report.md and {len(doc['scenarios'])} image grids")
    return EXIT_OK


def _site_target(name: str, cfg: FederationConfig, args: argparse.Namespace) -> dict[str, Any]:
    from ..attacks.mia import MiaSettings, site_model_attack

    which, private, scheme, sites, model = MIA_TARGETS[name]
    model = args.mia_model or model
    # The 81-image share trains 4x as long: the overfit case the attack should find.
    epochs = args.mia_epochs * (4 if scheme == "iid" else 1)
    part = cfg.data.partition
    mia = MiaSettings(dataset=cfg.data.dataset, path=cfg.data.path, model=model, scheme=scheme,
                      sites=sites if scheme == "iid" else len(cfg.sites) or sites, alpha=part.alpha,
                      split_seed=part.seed, epochs=epochs, references=args.references,
                      epsilon=cfg.dp.target_epsilon, delta=cfg.dp.target_delta,
                      lr=0.001 if model == "small_cnn" else 0.01,
                      optimizer="adam" if model == "small_cnn" else "sgd", seed=args.seed)
    return {**site_model_attack(mia, which=which, private=private), "scheme": scheme,
            "settings": asdict(mia)}
