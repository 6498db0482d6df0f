"""``asagiri provision PROJECT --out KITS``, ``asagiri fingerprint FILE`` and ``asagiri check --config FILE``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import EXIT_CONFIG, EXIT_OK

__all__ = ["add_parsers", "run_check", "run_fingerprint", "run_provision"]


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("provision", help="write every party's startup kit (keys, fed.yaml, site.yaml) from project.yaml")
    p.add_argument("project", type=Path, help="the project file (docs/deployment.md, 'Provisioning')")
    p.add_argument("--out", type=Path, required=True, help="folder for coordinator/ and site-N/")
    p.add_argument("--force", action="store_true", help="write new kits over those in --out (new keys for everyone; deletes nothing else)")
    f = sub.add_parser("fingerprint", help="print a key's fingerprint, the short form the logs show")
    f.add_argument("key", type=Path, help="a .pub file, a .key file, or a site.yaml / fed.yaml (the keys it pins)")
    c = sub.add_parser("check", help="preflight a site.yaml (key, data, the coordinator reachable with the pinned "
                                     "key) or a fed.yaml (key, ports, data)")
    c.add_argument("--config", type=Path, required=True, help="a site's site.yaml, or the coordinator's fed.yaml")
    c.add_argument("--offline", action="store_true", help="a site: do not contact the coordinator")


def run_provision(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_project
    from ..provision import KitsExist, provision

    try:
        kits = provision(load_project(args.project), args.out, force=args.force)
    except (ConfigError, KitsExist, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for kit in kits:
        print(f"{kit.party:<12} {kit.fingerprint}  {kit.config}")
    print(f"\nGive each party its folder only; compare the fingerprints above with each operator over a "
          f"channel you trust. Start the coordinator with: asagiri-coordinator --config {kits[0].config}")
    return EXIT_OK


def run_fingerprint(args: argparse.Namespace) -> int:
    from ..wire.crypto import Identity, PublicIdentity

    path: Path = args.key
    try:
        if path.suffix in (".yaml", ".yml"):
            return _pinned(path)
        if path.suffix == ".key":
            public = Identity.load(path).public
        else:
            public = PublicIdentity.from_hex(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{public.fingerprint()}  {path}")
    return EXIT_OK


def _pinned(path: Path) -> int:
    """Every key a site's or the coordinator's config pins, by whom."""
    import yaml

    from ..wire.crypto import PublicIdentity

    data = yaml.safe_load(path.read_text()) or {}
    keys: list[tuple[str, str]] = []
    if isinstance(data.get("coordinator"), dict) and "public_key" in data["coordinator"]:
        keys.append(("coordinator", data["coordinator"]["public_key"]))
    keys += [(f"site {i}", k) for i, k in sorted((data.get("peers") or {}).items())]
    keys += [(f"site {s.get('id')}", s["public_key"]) for s in data.get("sites") or [] if isinstance(s, dict) and "public_key" in s]
    if not keys:
        print(f"error: {path}: pins no keys (no coordinator.public_key, peers or sites; a project file? 'asagiri "
              "provision' prints every fingerprint, and each kit's README lists them)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        lines = [f"{who:<12} {PublicIdentity.from_hex(str(key)).fingerprint()}" for who, key in keys]
    except ValueError as exc:
        print(f"error: {path}: a pinned key is not a public key ({exc})", file=sys.stderr)
        return EXIT_CONFIG
    print("\n".join(lines))
    return EXIT_OK


def run_check(args: argparse.Namespace) -> int:
    """One line per finding; exit 0 when nothing is wrong, 2 otherwise."""
    import yaml

    from ..config import ConfigError, load_federation, load_site
    from ..preflight import coordinator_problems, probe_coordinator, site_problems

    path: Path = args.config
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        is_site = isinstance(raw, dict) and "site_id" in raw
        if is_site:
            site = load_site(path)
            notes, problems = site_problems(site)
            if not args.offline and not any(p.startswith("identity_key") for p in problems):
                problems += [p] if (p := probe_coordinator(site)) else []
                notes += [] if p else [f"coordinator {site.coordinator.host}:{site.coordinator.port} answered with "
                                       "the pinned key and enrols this site"]
        else:
            notes, problems = coordinator_problems(load_federation(path))
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for note in notes:
        print(f"ok: {note}")
    for problem in problems:
        print(f"error: {path.name}: {problem}", file=sys.stderr)
    return EXIT_CONFIG if problems else EXIT_OK
