"""``asagiri-coordinator --config fed.yaml [--resume] [--set key=value ...]``"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from ..config import ConfigError, load_federation
from ..faults import COORDINATOR_POINTS, NO_FAULTS
from ..observe.events import Event, StatusLines
from ..promhttp import MetricsPortTaken
from ..recipes import dp_advice
from .common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    cancel_on_signal,
    fault_type,
    run_main,
    setup_logging,
)

log = logging.getLogger("asagiri.coordinator")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asagiri-coordinator", description="Run an Asagiri federation's coordinator.")
    p.add_argument("--config", default="fed.yaml", help="federation config (default: ./fed.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted path (repeatable)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per log line, for machines (and no live view)")
    p.add_argument("--no-live", action="store_true", help="plain progress lines even on a terminal")
    p.add_argument("--status-fd", type=int, default=None, metavar="FD",
                   help="write the bound port, then every round event, as JSON lines to this inherited file descriptor")
    # fault injection (tests, soak runs): POINT:ROUND, asagiri/faults.py
    p.add_argument("--crash-at", type=fault_type(COORDINATOR_POINTS), default=NO_FAULTS, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "coordinator", args.log_format)
    return run_main(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..coordinator.checks import check_federation
    from ..coordinator.server import Coordinator, FederationFailed, ResumeError
    from ..initial import initial_params

    cfg = load_federation(Path(args.config), args.overrides)
    check_federation(cfg, Path(args.config).name)
    if not cfg.sites:
        raise ConfigError(f"{Path(args.config).name}: sites: no site is enrolled")
    from ..preflight import key_problem

    if (advice := dp_advice(cfg)) is not None:
        log.warning("%s", advice)
    if (problem := key_problem(cfg.identity_key, "identity_key")) is not None:
        print(f"error: {Path(args.config).name}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    status = StatusLines(os.fdopen(args.status_fd, "w")) if args.status_fd is not None else None
    watchers: list[Callable[[Event], None]] = [status] if status is not None else []
    live = None
    if sys.stdout.isatty() and args.log_format == "text" and not args.no_live:
        from rich.logging import RichHandler

        from ..observe.live import LiveView

        live = LiveView([s.id for s in cfg.sites], cfg.rounds)
        watchers.append(live)
        # Log records print above the live view, not through it.
        logging.getLogger().handlers = [RichHandler(console=live.live.console, show_path=False)]
    try:
        coordinator = Coordinator(cfg, initial=initial_params(cfg), resume=args.resume, faults=args.crash_at,
                                  console=live is None, watchers=watchers)
    except ResumeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, ValueError) as exc:  # a missing key, an unreadable or unwritable run directory
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    outcome: dict[str, Any] = {"code": EXIT_OK, "summary": {}}

    async def main_task() -> None:
        async with anyio.create_task_group() as tg:

            def stopping(name: str) -> None:
                log.warning("%s: stopping; every completed round is checkpointed (--resume continues)", name)
                outcome["code"] = EXIT_INTERRUPTED

            async def run_then_stop() -> None:
                announced = _Announced(cfg.listen.host, status)
                try:
                    outcome["summary"] = await coordinator.run(task_status=announced)
                except OSError as exc:
                    if announced.port is not None:
                        raise  # a failure after it listened: not a port problem
                    name = Path(args.config).name
                    if isinstance(exc, MetricsPortTaken):
                        print(f"error: {name}: {exc.strerror}. Free the port or choose another", file=sys.stderr)
                    else:
                        print(f"error: cannot listen on {cfg.listen.host}:{cfg.listen.port}: {exc.strerror or exc}. "
                              f"Free the port or choose another (listen.port in {name})", file=sys.stderr)
                    outcome["code"] = EXIT_CONFIG
                finally:
                    tg.cancel_scope.cancel()

            tg.start_soon(cancel_on_signal, tg.cancel_scope, stopping)
            tg.start_soon(run_then_stop)

    try:
        anyio.run(main_task)
    except BaseExceptionGroup as group:
        if live is not None:
            live.close()
        failed, rest = group.split(FederationFailed)
        unwritable, rest = rest.split(_file_error) if rest is not None else (None, None)
        if rest is not None:
            raise
        if unwritable is not None:
            exc = _leaves(unwritable)[0]
            log.error("cannot write %s: %s", exc.filename, exc.strerror)
            print(f"error: cannot write {exc.filename}: {exc.strerror}. The rounds recorded so far are kept (the "
                  f"checkpoint and the audit log agree); free space or fix the permissions, then continue with "
                  f"--resume", file=sys.stderr)
            return EXIT_RUNTIME
        assert failed is not None
        print(f"error: {_leaves(failed)[0]}", file=sys.stderr)
        return EXIT_FAILED
    except FederationFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if live is not None:
            live.close()
    if outcome["code"] != EXIT_OK:
        return outcome["code"]
    print(f"summary: {(cfg.run_dir / 'summary.json').resolve()}", flush=True)
    summary = outcome["summary"]
    if summary.get("status") == "refused_by_sites":  # the run never did what it was for
        print(f"error: {summary.get('message') or 'the sites refused the run'}; each site's log names its rule",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _file_error(exc: BaseException) -> bool:
    """A write into the run directory failed (a full disk, a read-only mount, a permission)."""
    return isinstance(exc, OSError) and exc.filename is not None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    return [leaf for e in group.exceptions for leaf in (_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])]


class _Announced:
    """Says where the coordinator listens the moment it does, before the federation's first event:
    the status pipe's first line is always ``listening`` (``launcher.StatusPipe``)."""

    def __init__(self, host: str, status: StatusLines | None) -> None:
        self.host, self.status = host, status
        self.port: int | None = None  # set once it listens

    def started(self, port: int) -> None:
        self.port = port
        print(f"listening on {self.host}:{port}", flush=True)
        if self.status is not None:
            self.status.write({"event": "listening", "host": self.host, "port": port, "pid": os.getpid()})


if __name__ == "__main__":
    sys.exit(main())
