"""Loopback federations: the run directory's layout, and starting its processes.

One place lays out keys and configs (``write_federation``, ``write_site_config``) and starts the
coordinator and site processes, for ``asagiri demo``, the end-to-end tests and the TCP
benchmarks.  The coordinator reports its bound port and its progress as JSON lines on a pipe
(``--status-fd``, :class:`StatusPipe`), never as printed text a launcher would have to parse.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml

from .config import FederationConfig, SiteConfig, apply_overrides, load_federation, load_site
from .coordinator.checks import check_federation
from .wire.crypto import Identity

__all__ = ["StatusPipe", "pinned_site_settings", "signals_held", "site_configs", "start_coordinator", "start_site",
           "stop_processes", "write_federation", "write_site_config"]


def write_federation(out: Path, *, sites: int, rounds: int, overrides: list[str],
                     recipe: Mapping[str, Any] | None = None) -> tuple[Path, FederationConfig]:
    """Keys, ``config/fed.yaml`` (``recipe``'s settings, then the overrides, applied and validated)
    for a loopback federation."""
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
    data = apply_overrides(_merged(data, copy.deepcopy(dict(recipe or {}))), overrides, source="fed.yaml")
    path = data["data"].get("path") if isinstance(data.get("data"), dict) else None
    if path is not None:  # given on the command line: relative to where it was typed, not to config/
        data["data"]["path"] = str(Path(str(path)).resolve())
    fed_path = out / "config" / "fed.yaml"
    fed_path.parent.mkdir(parents=True, exist_ok=True)
    fed_path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_federation(fed_path)
    check_federation(cfg, fed_path.name)
    return fed_path, cfg


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merged(base[key], value)
        else:
            base[key] = value
    return base


def pinned_site_settings(cfg: FederationConfig, site: int | None = None) -> dict[str, Any]:
    """What a demo site's config adds: every site's identity key pinned (as a real deployment
    exchanges them out of band), its simulated share of the federation's one file (``site``'s
    place in the roster, of as many shares as sites), a training seed (``train_seed``: the demo
    lays out every site, so it makes the run reproducible from ``selection.seed``, as recorded
    results need; a deployed site draws its own), a policy that shares its test predictions (the
    pooled test AUC of earlier results; a deployed site sends its own AUC by default), and, for a
    run with secure aggregation off, one that lets the site send its update in the clear (the
    default refuses to)."""
    out: dict[str, Any] = {"peers": {entry.id: entry.public_key for entry in cfg.sites},
                           "train_seed": cfg.selection.seed % (1 << 62),
                           # every simulated site is the user's own: the test AUC is pooled over their scores
                           "policy": {"share_predictions": True}}
    if site is not None:
        out["simulation"] = {"share": cfg.site_index(site), "shares": len(cfg.sites)}
    if cfg.data.path is not None:  # the file the federation's data config names, for every site
        out["data_path"] = str(cfg.data.path)
    if not cfg.secagg.enabled:
        out["policy"]["require_secagg"] = False
    return out


def write_site_config(out: Path, site: int, port: int, coordinator_pub: str, extra: Mapping[str, Any]) -> Path:
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


def site_configs(out: Path, cfg: FederationConfig, *, port: int = 1,
                 extra: Mapping[int, Mapping[str, Any]] | None = None) -> dict[int, SiteConfig]:
    """Every site's config for the federation laid out in ``out`` (``port`` only matters over TCP)."""
    pub = (out / "keys" / "coordinator.pub").read_text().strip()
    configs = {}
    for entry in cfg.sites:
        settings = pinned_site_settings(cfg, entry.id)
        mine = {**settings, **(extra or {}).get(entry.id, {})}
        mine["policy"] = {**settings.get("policy", {}), **mine.get("policy", {})}
        configs[entry.id] = load_site(write_site_config(out, entry.id, port, pub, mine))
    return configs


class StatusPipe:
    """The read end of a coordinator's ``--status-fd``: one JSON object per line, the first
    ``{"event": "listening", "port": ...}``, then one per driver event (``observe.events``)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self._buf = b""
        self.seen: list[dict[str, Any]] = []

    def child_started(self) -> None:
        os.close(self.write_fd)  # the child holds it now; its exit ends the stream

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next status line, or None once the coordinator closed the pipe (it exited)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = max(0.0, deadline - time.monotonic())
            if not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError(f"no status from the coordinator within {timeout:.0f}s")
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        record = json.loads(line)
        self.seen.append(record)
        return record

    def read(self, until: str | None, timeout: float) -> list[dict[str, Any]]:
        """The statuses up to and including the first of kind ``until``, or to the coordinator's exit."""
        out = []
        deadline = time.monotonic() + timeout
        while (record := self.next(max(0.0, deadline - time.monotonic()))) is not None:
            out.append(record)
            if record["event"] == until:
                break
        return out

    def until(self, event: str, timeout: float) -> dict[str, Any]:
        """Read up to and including the first status of kind ``event``."""
        records = self.read(event, timeout)
        if not records or records[-1]["event"] != event:
            raise EOFError(f"the coordinator exited before {event}")
        return records[-1]

    def close(self) -> None:
        os.close(self.read_fd)


def start_coordinator(fed_path: Path, *extra: str, stdout: IO[Any] | int | None,
                      stderr: IO[Any] | int | None) -> tuple[subprocess.Popen, StatusPipe, int]:
    """Start ``asagiri-coordinator`` on ``fed_path``; returns the process, its status pipe and its
    port.  Interrupted, or the coordinator failing to start, it leaves no process behind."""
    status = StatusPipe()
    proc = None
    try:
        with signals_held():
            proc = subprocess.Popen(
                [sys.executable, "-m", "asagiri.cli.coordinator", "--config", str(fed_path),
                 "--status-fd", str(status.write_fd), *extra],
                stdout=stdout, stderr=stderr, pass_fds=(status.write_fd,), preexec_fn=_as_a_child(),
            )
        status.child_started()
        first = status.next(timeout=120)
        if first is None or first["event"] != "listening":
            try:
                proc.wait(timeout=30)  # it is exiting: let it write why
            except subprocess.TimeoutExpired:
                stop_processes([proc])
            raise RuntimeError(f"the coordinator did not start (exit code {proc.returncode})")
    except BaseException:
        if proc is not None:
            stop_processes([proc])
        status.close()
        raise
    return proc, status, int(first["port"])


def start_site(site_cfg: Path, site: int, *extra: str, log: IO[Any] | None) -> subprocess.Popen:
    """Start ``asagiri-client``.  A caller that must stop what it started holds
    :func:`signals_held` around this call and its own record of the process."""
    with signals_held():
        return subprocess.Popen(
            [sys.executable, "-m", "asagiri.cli.client", "--site", str(site), "--config", str(site_cfg), *extra],
            stdout=log, stderr=log, preexec_fn=_as_a_child(),
        )


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 10) -> None:
    """SIGTERM each process still running, then SIGKILL what has not exited ``grace_s`` later."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


_HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a child is forked and recorded.  One that arrives during the
    fork runs Python's handler inside an at-fork hook, which swallows the KeyboardInterrupt:
    ``asagiri demo`` interrupted while starting its sites went on to the end.  Held, it is
    delivered when the block ends, once the caller knows what to stop.  Nests."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _as_a_child() -> Callable[[], None]:
    """In the child, before exec: take Ctrl-C and SIGTERM again (the mask is inherited), and, on
    Linux, get SIGTERM when the process that started it dies, however it died, so an ``asagiri
    demo`` (or a test run) killed outright leaves no coordinator or site behind.  SIGTERM, not
    SIGKILL: both CLIs stop cleanly on it (exit code 130)."""
    parent = os.getpid()
    # looked up here, in the parent: nothing that may take the loader's lock runs after the fork
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def preexec() -> None:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the line above took effect
                os.kill(os.getpid(), signal.SIGTERM)

    return preexec
