"""``asagiri demo``: a real federation on loopback: one coordinator and N site processes.

Lays out the run directory (``keys/``, ``config/fed.yaml``, ``sites/site-N.yaml``, ``logs/``; the
coordinator writes ``metrics.jsonl``, ``audit.jsonl``, ``summary.json`` and the checkpoint at its
top), starts every process through ``asagiri.launcher``, prints the progress the coordinator
reports on its status pipe, and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from ..causes import Rule
from ..config import ConfigError, FederationConfig, StrategyConfig
from ..launcher import (
    StatusPipe,
    pinned_site_settings,
    signals_held,
    start_coordinator,
    start_site,
    stop_processes,
    write_federation,
    write_site_config,
)
from ..observe.recorder import console_line
from ..recipes import dp_advice, load_recipe
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_RUNTIME

__all__ = ["run_demo"]


def run_demo(args: argparse.Namespace) -> int:
    # SIGTERM (a CI timeout, a service manager) stops the demo as Ctrl-C does: everything it
    # started is stopped, and the exit code is 130
    signal.signal(signal.SIGTERM, _interrupted)
    out: Path = args.out.resolve()
    if (out / "checkpoint.npz").exists() or (out / "metrics.jsonl").exists():
        print(f"error: {out} already holds a run; choose another --out", file=sys.stderr)
        return EXIT_CONFIG
    try:
        recipe = load_recipe(args.config) if args.config is not None else None
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    args.sites = args.sites or (recipe and recipe.sites) or 4
    args.rounds = args.rounds or (recipe and recipe.rounds) or 3
    if args.sites < 1 or args.rounds < 1:
        print("error: --sites and --rounds must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    out.mkdir(parents=True, exist_ok=True)
    try:
        fed_path, cfg = write_federation(out, sites=args.sites, rounds=args.rounds, overrides=args.overrides,
                                         recipe=recipe.settings if recipe else None)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if (advice := dp_advice(cfg)) is not None:
        print(f"warning: {advice}", file=sys.stderr)
    if cfg.secagg.enabled and args.sites < 3:
        print("error: secure aggregation needs at least 3 sites (each site's policy.min_participants is 3); "
              "use --sites 3 or more, or --set secagg.enabled=false", file=sys.stderr)
        return EXIT_CONFIG
    if not cfg.secagg.enabled:
        print("warning: secure aggregation is off: the coordinator sees every site's update", file=sys.stderr)
    print(f"run directory: {out}")
    print(f"federation: {args.sites} sites, {cfg.rounds} rounds, {cfg.model.name} on {cfg.data.dataset}, "
          f"strategy {describe_strategy(cfg.strategy)}, min_clients={cfg.min_clients}",
          flush=True)
    code = _orchestrate(out, fed_path, cfg, args)
    summary_path = out / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        final = summary.get("final", {})
        auc = final.get("auc")
        print(
            f"summary: status={summary['status']} rounds={summary['rounds_completed']}/{summary['rounds_planned']} "
            f"auc={'n/a' if auc is None else f'{auc:.4f}'} accuracy={final.get('accuracy', float('nan')):.4f} "
            f"mean_round_s={summary.get('mean_round_s')}  ({summary_path})"
        )
        if (privacy := privacy_line(cfg, summary)) is not None:
            print(privacy)
        from ..observe.report import write_report

        print(f"report: {write_report(out)}")
    return code


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def privacy_line(cfg: FederationConfig, summary: dict) -> str | None:
    """The privacy the sites spent, as far as they let the coordinator know, said plainly either way."""
    if not cfg.dp.enabled:
        return None
    spent = summary.get("epsilon") or {}
    if not spent:
        return (f"privacy: the sites did not report epsilon (policy.report_privacy is off by default: with "
                f"noise_multiplier auto it gives a site's data size away); each site's log and "
                f"state_dir/privacy_ledger.json hold its own, against the target {cfg.dp.target_epsilon:g}")
    per_site = ", ".join(f"site {s} {float(e):.3f}" for s, e in sorted(spent.items(), key=lambda kv: int(kv[0])))
    return f"privacy: epsilon spent {per_site} (target {cfg.dp.target_epsilon:g}, delta {cfg.dp.target_delta:g})"


def _wait_for_sites(sites: list[subprocess.Popen], grace: float = 30) -> None:
    """The federation is over: give each site ``grace`` seconds to exit, then stop it.  A site
    still reconnecting (it was dropped, and missed the end) does not make a completed run fail."""
    for site, proc in enumerate(sites, start=1):
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            stop_processes([proc])
            print(f"warning: site {site} was still running {grace:g}s after the federation ended (reconnecting?); "
                  "stopped it", file=sys.stderr)


def _orchestrate(out: Path, fed_path: Path, cfg: FederationConfig, args: argparse.Namespace) -> int:
    """Start the coordinator and the sites through the launcher, print the coordinator's progress
    from its status pipe, stop everything started."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    level = ("--log-level", args.log_level)
    deadline = time.monotonic() + args.timeout
    procs: list[subprocess.Popen] = []
    status: StatusPipe | None = None
    with ExitStack() as files:
        coord_log = files.enter_context(open(logs / "coordinator.log", "ab"))
        try:
            try:
                coordinator, status, port = start_coordinator(fed_path, *level, stdout=coord_log, stderr=coord_log)
            except RuntimeError:
                print(f"error: the coordinator did not start (see {logs / 'coordinator.log'})", file=sys.stderr)
                return EXIT_CONFIG
            procs.append(coordinator)
            print(f"listening on 127.0.0.1:{port}", flush=True)
            if cfg.metrics_port:  # 0 would be a port the coordinator picks: its log names it
                print(f"metrics: http://{cfg.listen.host}:{cfg.metrics_port}/metrics", flush=True)
            pub = (out / "keys" / "coordinator.pub").read_text().strip()
            for site in range(1, args.sites + 1):
                settings = pinned_site_settings(cfg, site)
                # every demo site is the user's own: it reports the privacy it spent, so the console,
                # the summary and the report show it (a deployed site keeps it unless it sets this)
                settings["policy"]["report_privacy"] = True
                site_cfg = write_site_config(out, site, port, pub, settings)
                site_log = files.enter_context(open(logs / f"site-{site}.log", "ab"))
                with signals_held():  # a Ctrl-C here stops this site too
                    procs.append(start_site(site_cfg, site, *level, log=site_log))
            refused: dict[int, str] = {}
            while (record := status.next(timeout=max(0.0, deadline - time.monotonic()))) is not None:
                if record["event"] == "SiteRefused" and Rule(record["rule"]).is_policy:
                    refused[record["site"]] = record["rule"]
                line = console_line(record, cfg.rounds)
                if line is not None:
                    print(line, flush=True)
            rc = coordinator.wait(timeout=max(1.0, deadline - time.monotonic()))
            _wait_for_sites(procs[1:])
            _report_failed_sites(procs[1:], logs)
            _report_refusing_sites(refused, logs)
            return {0: EXIT_OK, EXIT_FAILED: EXIT_FAILED}.get(rc, EXIT_RUNTIME)
        except (TimeoutError, subprocess.TimeoutExpired):
            print(f"error: the demo did not finish within {args.timeout:.0f}s", file=sys.stderr)
            return EXIT_RUNTIME
        finally:
            stop_processes(procs)
            if status is not None:
                status.close()


def last_error_line(log: Path, containing: str = "") -> str:
    """The last line of a process's log (with ``containing`` in it): the exception of a traceback,
    or the error it logged."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip() and containing in ln]
    except OSError:
        return f"(no log at {log})"
    return lines[-1] if lines else "(not in its log)"


def _report_refusing_sites(refused: dict[int, str], logs: Path) -> None:
    """A site that refused the whole run told the coordinator only the rule; its own reason is in
    its log, which the person running the demo may read."""
    for site, rule in sorted(refused.items()):
        log = logs / f"site-{site}.log"
        print(f"site {site} refused the run ({rule}): {last_error_line(log, 'refused (')}  ({log})", file=sys.stderr)


def _report_failed_sites(sites: list[subprocess.Popen], logs: Path) -> None:
    """Say which site processes failed, with each one's own last error line."""
    for site, proc in enumerate(sites, start=1):
        if proc.returncode not in (0, None):
            log = logs / f"site-{site}.log"
            print(f"site {site} exited with code {proc.returncode}: {last_error_line(log)}  ({log})",
                  file=sys.stderr)


def describe_strategy(s: StrategyConfig) -> str:
    """The server optimiser and the parts combined with it, as a person names them."""
    parts = [s.name]
    if s.mu > 0 and s.name != "fedprox":
        parts.append(f"FedProx mu={s.mu:g}")
    if s.server_momentum > 0 and s.name != "fedavgm":
        parts.append(f"server momentum {s.server_momentum:g}")
    parts += [name for name, on in (("FedBN", s.fedbn), ("SCAFFOLD", s.scaffold)) if on]
    return " + ".join(parts)
