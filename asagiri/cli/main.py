"""``asagiri``: sub-commands ``keygen``, ``provision``, ``fingerprint``, ``partition``, ``demo``, ``report``,
``attack`` and ``audit``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import DataConfig
from .common import EXIT_CONFIG, EXIT_OK, run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asagiri", description="Asagiri federated learning for medical imaging.")
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("keygen", help="create an Ed25519 identity key pair")
    who = k.add_mutually_exclusive_group(required=True)
    who.add_argument("--site", type=int, help="site id the key is for")
    who.add_argument("--coordinator", action="store_true", help="make the coordinator's key")
    k.add_argument("--out", type=Path, required=True, help="folder for <name>.key (mode 0600) and <name>.pub")
    k.add_argument("--force", action="store_true", help="overwrite an existing key")

    pt = sub.add_parser("partition", help="split a data set across sites and write a statistics report")
    pt.add_argument("--dataset", required=True,
                    choices=["pneumoniamnist", "dermamnist", "medmnist", "nih", "isic", "synthetic"])
    pt.add_argument("--path", type=Path, default=None, help="the data set's file or folder (default: bundled)")
    pt.add_argument("--sites", type=int, required=True)
    pt.add_argument("--scheme", choices=["iid", "dirichlet", "quantity", "feature"], default="dirichlet")
    pt.add_argument("--alpha", type=float, default=0.3)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--image-size", type=int, default=28)
    pt.add_argument("--feature-key", default=None, help="feature scheme: view (ChestX-ray14), age_band, site (ISIC)")
    pt.add_argument("--val-fraction", type=float, default=DataConfig().val_fraction,
                    help="patients held out for validation where the files have no validation split (ISIC, NIH)")
    pt.add_argument("--out", type=Path, required=True)

    d = sub.add_parser("demo", help="run a local federation: coordinator and sites as separate processes")
    d.add_argument("--config", type=Path, default=None, metavar="RECIPE",
                   help="a recipe (examples/*.yaml): the federation's settings, before any --set")
    d.add_argument("--sites", type=int, default=None, help="default: the recipe's demo.sites, else 4")
    d.add_argument("--rounds", type=int, default=None, help="default: the recipe's rounds, else 3")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a fed.yaml value by its dotted path (repeatable)")
    d.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    d.add_argument("--log-level", default="info",
                   help="log level of the processes the demo starts (their logs are files in OUT/logs/)")

    rp = sub.add_parser("report", help="write a run's HTML report (plots embedded) and its PNGs")
    rp.add_argument("run_dir", type=Path)
    rp.add_argument("--out", type=Path, default=None, help="folder for report.html and the PNGs (default RUN_DIR/report)")

    from .attack import add_parser as add_attack
    from .audit import add_parser as add_audit
    from .provision import add_parsers as add_provision

    add_attack(sub)
    add_audit(sub)
    add_provision(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("warning", "asagiri")
    if args.command == "keygen":
        return run_main(lambda: _keygen(args))
    if args.command == "partition":
        return run_main(lambda: _partition(args))
    if args.command == "demo":
        from .demo import run_demo

        return run_main(lambda: run_demo(args))
    if args.command == "attack":
        from .attack import run_attack

        return run_main(lambda: run_attack(args))
    if args.command == "report":
        return run_main(lambda: _report(args))
    if args.command == "audit":
        from .audit import run_audit

        return run_main(lambda: run_audit(args))
    if args.command in ("provision", "fingerprint", "check"):
        from .provision import run_check, run_fingerprint, run_provision

        run = {"provision": run_provision, "fingerprint": run_fingerprint, "check": run_check}[args.command]
        return run_main(lambda: run(args))
    return EXIT_CONFIG


def _report(args: argparse.Namespace) -> int:
    from ..observe.report import write_report

    run = Path(args.run_dir)
    fed = run / "config" / "fed.yaml"
    ran = (run / "summary.json").exists() or (run / "metrics.jsonl").exists()
    if ran and fed.exists():  # a simulated run: its label mix, rebuilt from its data split, for the report
        from ..config import load_federation
        from ..data.report import write_label_mix

        cfg = load_federation(fed)
        write_label_mix(run, cfg.data, [s.id for s in cfg.sites])
    try:
        path = write_report(args.run_dir, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"report: {path}")
    return EXIT_OK


def _partition(args: argparse.Namespace) -> int:
    from ..data.report import partition_report

    if args.sites < 1:
        print("error: --sites must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    try:
        stats = partition_report(
            dataset=args.dataset, path=args.path, sites=args.sites, scheme=args.scheme, alpha=args.alpha,
            seed=args.seed, out=args.out, image_size=args.image_size, feature_key=args.feature_key,
            val_fraction=args.val_fraction,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print((args.out / "stats.md").read_text())
    print(f"wrote {args.out}/site-1..{stats['sites']}.json, stats.json, stats.md, stats.png")
    return EXIT_OK


def _keygen(args: argparse.Namespace) -> int:
    from ..wire.crypto import Identity

    name = "coordinator" if args.coordinator else f"site-{args.site}"
    key_path = args.out / f"{name}.key"
    if key_path.exists() and not args.force:
        print(f"error: {key_path} exists (use --force to replace it)", file=sys.stderr)
        return EXIT_CONFIG
    identity = Identity.generate()
    identity.save(key_path)
    pub = identity.public.hex()
    (args.out / f"{name}.pub").write_text(pub + "\n")
    print(pub)
    print(f"wrote {key_path} (private, mode 0600) and {args.out / (name + '.pub')}; fingerprint "
          f"{identity.public.fingerprint()}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
