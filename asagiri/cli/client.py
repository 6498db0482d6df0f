"""``asagiri-client --site 2 [--config sites/site-2.yaml] [--set key=value ...]``"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anyio

from ..config import load_site
from ..faults import NO_FAULTS, SITE_POINTS
from ..promhttp import MetricsPortTaken
from .common import (
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    cancel_on_signal,
    fault_type,
    run_main,
    setup_logging,
)

log = logging.getLogger("asagiri.client")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asagiri-client", description="Run one Asagiri site.")
    p.add_argument("--site", type=int, required=True, help="this site's id (as enrolled in the roster)")
    p.add_argument("--config", default=None,
                   help="site config (default: $ASAGIRI_SITE_CONFIG, else ./site-<id>.yaml, else a kit's ./site.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per log line, for machines")
    # fault injection (tests, soak runs): POINT:ROUND, asagiri/faults.py
    p.add_argument("--kill-at", type=fault_type(SITE_POINTS), default=NO_FAULTS, help=argparse.SUPPRESS)
    return p


def default_config_path(site: int) -> Path:
    import os

    env = os.environ.get("ASAGIRI_SITE_CONFIG")
    if env:
        return Path(env)
    named = Path(f"site-{site}.yaml")
    # in a provisioned kit the file is site.yaml
    return named if named.exists() or not Path("site.yaml").exists() else Path("site.yaml")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, f"site-{args.site}", args.log_format)
    return run_main(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from ..client.runtime import run_client

    path = Path(args.config) if args.config else default_config_path(args.site)
    cfg = load_site(path, args.overrides)
    if cfg.site_id != args.site:
        print(f"error: {path.name}: site_id={cfg.site_id} but --site {args.site}", file=sys.stderr)
        return EXIT_CONFIG
    from ..preflight import site_problems

    # the checks `asagiri check` makes, but the network's: a mistake here is found before connecting
    _, problems = site_problems(cfg, peers=False)  # the run's spec decides whether it needs pinned peers
    for problem in problems:
        print(f"error: {path.name}: {problem}", file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    from ..client.runtime import Site
    from ..client.state import StateError

    progress = sys.stderr.isatty() and args.log_format == "text"  # a bar of local training on a terminal
    try:
        site = Site(cfg, faults=args.kill_at, progress=progress)  # reads its state: a bad one is said here
    except (StateError, ValueError) as exc:
        print(f"error: {path.name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    result = {"code": EXIT_INTERRUPTED}

    async def main_task() -> None:
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                try:
                    result["code"] = await run_client(cfg, site=site)
                except StateError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    result["code"] = EXIT_RUNTIME
                except MetricsPortTaken as exc:
                    print(f"error: {path.name}: {exc.strerror}. Free the port or choose another", file=sys.stderr)
                    result["code"] = EXIT_CONFIG
                finally:
                    tg.cancel_scope.cancel()

            tg.start_soon(cancel_on_signal, tg.cancel_scope, lambda name: log.warning("%s: stopping", name))
            tg.start_soon(run)

    anyio.run(main_task)
    return result["code"]


if __name__ == "__main__":
    sys.exit(main())
