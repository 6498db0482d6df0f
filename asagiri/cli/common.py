"""What every entry point shares: logging set-up and mapping typed errors to exit codes, in one place."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable

import anyio

from ..config import ConfigError
from ..faults import FaultPlan

__all__ = ["cancel_on_signal", "EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "EXIT_RUNTIME", "run_main", "setup_logging"]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_FAILED = 3
EXIT_INTERRUPTED = 130


async def cancel_on_signal(scope: anyio.CancelScope, on_signal: Callable[[str], None]) -> None:
    """Cancel ``scope`` at the first SIGINT or SIGTERM, after telling ``on_signal`` which it was."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            on_signal(signal.Signals(signum).name)
            scope.cancel()
            return


class JsonLines(logging.Formatter):
    """One JSON object per log record, for machines (``--log-format json``)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "process": self.process, "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, name: str, fmt: str = "text") -> None:
    """Log lines on stderr: ``text`` for people, ``json`` (one object per line) for machines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(name) if fmt == "json" else
                         logging.Formatter(f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def run_main(fn: Callable[[], int]) -> int:
    """Run ``fn``; a user-facing error is one line on stderr and an exit code, never a traceback."""
    try:
        return fn()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def fault_type(points: tuple[str, ...]) -> Callable[[str], FaultPlan]:
    """An argparse type for a fault-injection flag (``POINT:ROUND``)."""
    def parse(spec: str) -> FaultPlan:
        try:
            return FaultPlan.parse(spec, points)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse
