"""``asagiri demo``: a real federation on loopback: one coordinator and N site processes.

Lays out the run directory (``keys/``, ``config/fed.yaml``, ``sites/site-N.yaml``, ``logs/``; the
coordinator writes ``metrics.jsonl``, ``audit.jsonl``, ``summary.json`` and the checkpoint at its
top), starts every process, relays the per-round lines, and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anyio
import anyio.abc

from ..config import ConfigError, FederationConfig
from ..launcher import StatusPipe, pinned_site_settings, write_federation, write_site_config
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_RUNTIME

__all__ = ["run_demo"]


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
    status: StatusPipe | None = None
    log_files = []
    code = EXIT_RUNTIME
    try:
        with anyio.fail_after(args.timeout):
            coord_log = open(logs / "coordinator.log", "ab")  # noqa: SIM115 - closed in finally
            log_files.append(coord_log)
            status = StatusPipe()
            coordinator = await anyio.open_process(
                [py, "-m", "asagiri.cli.coordinator", "--config", str(fed_path), "--log-level", args.log_level,
                 "--status-fd", str(status.write_fd)],
                stdout=-1, stderr=coord_log, pass_fds=(status.write_fd,),
            )
            status.child_started()
            procs.append(coordinator)
            assert coordinator.stdout is not None
            lines = _lines(coordinator.stdout)
            port = await _bound_port(status)
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
        if status is not None:
            status.close()
    return code


async def _bound_port(status: StatusPipe) -> int | None:
    """The port from the coordinator's first status line; None if it exited without listening."""
    while True:
        await anyio.wait_readable(status.read_fd)
        try:
            first = status.next(timeout=0)
        except TimeoutError:
            continue  # part of a line so far
        return int(first["port"]) if first is not None and first["event"] == "listening" else None


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
