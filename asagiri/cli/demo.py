"""``asagiri demo``: a real federation on loopback: one coordinator and N site processes.

Lays out the run directory (``keys/``, ``config/fed.yaml``, ``sites/site-N.yaml``, ``logs/``; the
coordinator writes ``metrics.jsonl``, ``audit.jsonl``, ``summary.json`` and the checkpoint at its
top), starts every process, relays the per-round lines, and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import yaml

from ..config import ConfigError, FederationConfig, apply_overrides, load_federation
from ..wire.crypto import Identity
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_RUNTIME

__all__ = ["pinned_site_settings", "run_demo", "write_federation", "write_site_config"]


def write_federation(out: Path, *, sites: int, rounds: int, overrides: list[str]) -> tuple[Path, FederationConfig]:
    """Keys, ``config/fed.yaml`` (overrides applied and validated) for a loopback federation."""
    keys = out / "keys"
    coord = Identity.generate()
    coord.save(keys / "coordinator.key")
    roster = []
    for site in range(1, sites + 1):
        ident = Identity.generate()
        ident.save(keys / f"site-{site}.key")
        (keys / f"site-{site}.pub").write_text(ident.public.hex() + "\n")
        roster.append({"id": site, "public_key": ident.public.hex()})
    (keys / "coordinator.pub").write_text(coord.public.hex() + "\n")
    data: dict[str, Any] = {
        "run_id": f"demo-{int(time.time())}",
        "listen": {"host": "127.0.0.1", "port": 0},
        "identity_key": "../keys/coordinator.key",
        "run_dir": "..",
        "rounds": rounds,
        "min_clients": min(3, sites),
        "timeouts": {"wait_for_sites": 120, "fit": 600, "evaluate": 300},
        "sites": roster,
    }
    data = apply_overrides(data, overrides, source="fed.yaml")
    fed_path = out / "config" / "fed.yaml"
    fed_path.parent.mkdir(parents=True, exist_ok=True)
    fed_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return fed_path, load_federation(fed_path)


def pinned_site_settings(cfg: FederationConfig) -> dict[str, Any]:
    """What a demo site's config adds: every site's identity key pinned (as a real deployment
    exchanges them out of band), and, for a run with secure aggregation off, a policy that lets
    the site send its update in the clear (the default refuses to)."""
    out: dict[str, Any] = {"peers": {entry.id: entry.public_key for entry in cfg.sites}}
    if not cfg.secagg.enabled:
        out["policy"] = {"require_secagg": False}
    return out


def write_site_config(out: Path, site: int, port: int, coordinator_pub: str, extra: dict[str, Any]) -> Path:
    data = {
        "site_id": site,
        "identity_key": f"../keys/site-{site}.key",
        "coordinator": {"host": "127.0.0.1", "port": port, "public_key": coordinator_pub},
        "state_dir": f"site-{site}",
        "threads": 1,
        "reconnect": {"give_up_s": 120},
        **extra,
    }
    path = out / "sites" / f"site-{site}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_demo(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    if (out / "checkpoint.npz").exists() or (out / "metrics.jsonl").exists():
        print(f"error: {out} already holds a run; choose another --out", file=sys.stderr)
        return EXIT_CONFIG
    if args.sites < 1 or args.rounds < 1:
        print("error: --sites and --rounds must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    out.mkdir(parents=True, exist_ok=True)
    try:
        fed_path, cfg = write_federation(out, sites=args.sites, rounds=args.rounds, overrides=args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if cfg.secagg.enabled and args.sites < 3:
        print("error: secure aggregation needs at least 3 sites (each site's policy.min_participants is 3); "
              "use --sites 3 or more, or --set secagg.enabled=false", file=sys.stderr)
        return EXIT_CONFIG
    if not cfg.secagg.enabled:
        print("warning: secure aggregation is off: the coordinator sees every site's update", file=sys.stderr)
    print(f"run directory: {out}")
    print(f"federation: {args.sites} sites, {cfg.rounds} rounds, {cfg.model.name} on {cfg.data.dataset}, "
          f"strategy {cfg.strategy.name}{' + FedBN' if cfg.strategy.fedbn else ''}, min_clients={cfg.min_clients}",
          flush=True)
    code = anyio.run(_orchestrate, out, fed_path, cfg, args)
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
    return code


async def _orchestrate(out: Path, fed_path: Path, cfg: FederationConfig, args: argparse.Namespace) -> int:
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    py = sys.executable
    procs: list[anyio.abc.Process] = []
    log_files = []
    code = EXIT_RUNTIME
    try:
        with anyio.fail_after(args.timeout):
            coord_log = open(logs / "coordinator.log", "ab")  # noqa: SIM115 - closed in finally
            log_files.append(coord_log)
            coordinator = await anyio.open_process(
                [py, "-m", "asagiri.cli.coordinator", "--config", str(fed_path), "--log-level", args.log_level],
                stdout=-1, stderr=coord_log,
            )
            procs.append(coordinator)
            assert coordinator.stdout is not None
            lines = _lines(coordinator.stdout)
            port = None
            async for line in lines:
                if line.startswith("listening on "):
                    port = int(line.rsplit(":", 1)[1])
                    break
                print(line, flush=True)
            if port is None:
                await coordinator.wait()
                print(f"error: the coordinator did not start (see {logs / 'coordinator.log'})", file=sys.stderr)
                return EXIT_CONFIG if coordinator.returncode == EXIT_CONFIG else EXIT_RUNTIME
            pub = (out / "keys" / "coordinator.pub").read_text().strip()
            settings = pinned_site_settings(cfg)
            for site in range(1, args.sites + 1):
                site_cfg = write_site_config(out, site, port, pub, settings)
                site_log = open(logs / f"site-{site}.log", "ab")  # noqa: SIM115 - closed in finally
                log_files.append(site_log)
                procs.append(await anyio.open_process(
                    [py, "-m", "asagiri.cli.client", "--site", str(site), "--config", str(site_cfg),
                     "--log-level", args.log_level],
                    stdout=site_log, stderr=site_log,
                ))
            async for line in lines:
                print(line, flush=True)
            rc = await coordinator.wait()
            with anyio.move_on_after(30):
                for p in procs[1:]:
                    await p.wait()
            code = {0: EXIT_OK, EXIT_FAILED: EXIT_FAILED}.get(rc, EXIT_RUNTIME)
    except TimeoutError:
        print(f"error: the demo did not finish within {args.timeout:.0f}s", file=sys.stderr)
    finally:
        with anyio.CancelScope(shield=True):
            for p in procs:
                if p.returncode is None:
                    p.terminate()
            with anyio.move_on_after(10):
                for p in procs:
                    await p.wait()
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
        for fh in log_files:
            fh.close()
    return code


async def _lines(stream: anyio.abc.ByteReceiveStream):  # type: ignore[no-untyped-def]
    from anyio.streams.text import TextReceiveStream

    buf = ""
    async for chunk in TextReceiveStream(stream):
        buf += chunk
        while "\n" in buf:
            line, buf = buf.split("\n", 1)
            yield line
    if buf:
        yield buf
