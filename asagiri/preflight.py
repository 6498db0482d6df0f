"""Preflight checks of a site's or the coordinator's set-up (``asagiri check``), and the ones both
CLIs run at start-up before connecting or listening.

Each problem is one line naming what is wrong and the fix.  Nothing here changes a file.
"""

from __future__ import annotations

import os
import socket
import stat
import zipfile
from pathlib import Path

import anyio
import numpy as np

from .config import FederationConfig, SiteConfig
from .wire.crypto import AuthenticationFailed, Identity, PublicIdentity

__all__ = ["coordinator_problems", "data_summary", "key_problem", "probe_coordinator", "site_problems"]


def key_problem(path: Path, what: str) -> str | None:
    """The private identity key file: present, private, and an identity (not a ``.pub``)."""
    if not path.exists():
        return f"{what}: {path} does not exist (make one with `asagiri keygen`, or use your kit's .key file)"
    if path.suffix == ".pub":
        return f"{what}: {path} is a public key file; name the private .key file beside it"
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{what}: {path} is readable by others (mode {oct(mode & 0o777)}): chmod 600 {path}"
    try:
        Identity.load(path)
    except (OSError, ValueError) as exc:
        return f"{what}: {exc}"
    return None


def data_summary(path: Path) -> tuple[str | None, str | None]:
    """(what the data holds, or the problem with it): an ``.npz``'s splits and counts, or a folder's
    files."""
    if not path.exists():
        return None, f"data_path: {path} does not exist (the site's own data file or folder)"
    if not os.access(path, os.R_OK):
        return None, f"data_path: {path} is not readable by this user"
    if path.is_dir():
        files = sum(1 for p in path.rglob("*") if p.is_file())
        return f"{path}: a folder of {files} files", None if files else f"data_path: {path} is an empty folder"
    if path.name.endswith((".tar.gz", ".tgz")):  # DermaMNIST's bundled form: read whole at set-up
        return f"{path}: an archive of {path.stat().st_size / 2**20:.1f} MiB", None
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            counts = {k[: -len("_labels")]: len(npz[k]) for k in npz.files if k.endswith("_labels")}
            images = {k[: -len("_images")]: len(npz[k]) for k in npz.files if k.endswith("_images")}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None, (f"data_path: {path} is not an .npz file (NumPy's savez format, as MedMNIST ships; ISIC and "
                      "ChestX-ray14 are folders)")
    missing = sorted({f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")} - files)
    if missing:
        return None, f"data_path: {path} is not a MedMNIST file: it lacks {', '.join(missing)}"
    if (odd := [s for s in counts if images.get(s) != counts[s]]):
        return None, f"data_path: {path}: the {', '.join(odd)} images and labels differ in number"
    return f"{path}: " + ", ".join(f"{n} {split}" for split, n in counts.items()), None


def site_problems(cfg: SiteConfig, *, peers: bool = True) -> tuple[list[str], list[str]]:
    """(notes, problems) of a site's own set-up, without the network.  ``peers``: check the pinned
    site keys too (start-up leaves that to the run's spec, which says whether it needs them)."""
    notes, problems = [], []
    if (p := key_problem(cfg.identity_key, "identity_key")) is not None:
        problems.append(p)
    if cfg.data_path is not None:
        summary, problem = data_summary(cfg.data_path)
        notes += [summary] if summary else []
        problems += [problem] if problem else []
    elif cfg.simulation is None:
        # a newcomer's finding: a kit whose data_path was never filled in trained on the bundled
        # public sample, and said "its own data"
        problems.append("data_path is not set: name this site's own data file or folder (a site without one would "
                        "train on the public sample bundled with Asagiri)")
    if peers and not cfg.peers:
        problems.append("peers: no site keys pinned (your kit's site.yaml pins them; secure aggregation needs them)")
    elif peers and cfg.site_id not in cfg.peers:
        problems.append(f"peers: this site ({cfg.site_id}) is not among the pinned keys")
    notes.append(f"coordinator key pinned: fingerprint {PublicIdentity.from_hex(cfg.coordinator.public_key).fingerprint()}")
    return notes, problems


def probe_coordinator(cfg: SiteConfig, timeout: float = 10) -> str | None:
    """Reach the coordinator and check it holds the pinned key and enrols this site (a handshake
    up to the coordinator's signed reply; no session opens).  The problem, or None."""
    from .wire.channel import SiteRefused
    from .wire.connection import probe_handshake
    from .wire.errors import ConnectionLost, RemoteProtocolError

    where = f"{cfg.coordinator.host}:{cfg.coordinator.port}"

    async def probe() -> None:
        with anyio.fail_after(timeout):
            async with await anyio.connect_tcp(cfg.coordinator.host, cfg.coordinator.port) as stream:
                await probe_handshake(stream, Identity.load(cfg.identity_key), cfg.site_id,
                                      PublicIdentity.from_hex(cfg.coordinator.public_key))

    try:
        anyio.run(probe)
    except TimeoutError:
        return f"coordinator: no answer from {where} within {timeout:g}s (is it running? a firewall?)"
    except OSError as exc:
        return f"coordinator: cannot reach {where}: {exc.strerror or exc} (is it running? the host and port right?)"
    except AuthenticationFailed:
        return (f"coordinator: {where} does not hold the pinned key (coordinator.public_key): compare fingerprints "
                "with its operator")
    except SiteRefused as exc:
        return f"coordinator: {where} refused this site: {exc} (is it enrolled in the coordinator's fed.yaml?)"
    except (ConnectionLost, RemoteProtocolError) as exc:
        return f"coordinator: {where} broke off the handshake: {exc}"
    return None


def port_problem(host: str, port: int, what: str) -> str | None:
    if port == 0:
        return None
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            return f"{what}: cannot listen on {host}:{port}: {exc.strerror} (free it, or choose another)"
    return None


def coordinator_problems(cfg: FederationConfig) -> tuple[list[str], list[str]]:
    """(notes, problems) of the coordinator's set-up: its key, its ports, its data file."""
    notes, problems = [], []
    if (p := key_problem(cfg.identity_key, "identity_key")) is not None:
        problems.append(p)
    for problem in (port_problem(cfg.listen.host, cfg.listen.port, "listen.port"),
                    None if cfg.metrics_port is None else port_problem(cfg.listen.host, cfg.metrics_port,
                                                                        "metrics_port")):
        problems += [problem] if problem else []
    if cfg.data.path is not None:
        summary, problem = data_summary(Path(cfg.data.path))
        notes += [summary] if summary else []
        problems += [problem] if problem else []
    notes += [f"site {s.id}: fingerprint {PublicIdentity.from_hex(s.public_key).fingerprint()}" for s in cfg.sites]
    return notes, problems
