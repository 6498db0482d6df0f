"""``asagiri provision``: every party's startup kit from one ``project.yaml``.

What NVFlare's ``nvflare provision`` does for its parties, for ours: a fresh identity key per
party (mode 0600, never leaving its kit), the coordinator's ``fed.yaml`` with the roster of site
keys, and each site's ``site.yaml`` with the coordinator's key and every peer's key pinned, so no
hex is ever pasted by hand.  Each kit has a README for that party, and every key's fingerprint
(the short form the logs and ``asagiri fingerprint`` print) is returned for the operators to
compare out of band.  The hand-written flow (``asagiri keygen``, docs/deployment.md) keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import FederationConfig, ProjectConfig, SiteConfig, validated
from .coordinator.checks import check_federation
from .wire.crypto import Identity, PublicIdentity

__all__ = ["Kit", "KitsExist", "provision"]


class KitsExist(FileExistsError):
    """The output folder already holds kits: provisioning again would replace every key."""


@dataclass(frozen=True)
class Kit:
    party: str  # "coordinator" or "site-N"
    folder: Path
    config: Path
    fingerprint: str


def provision(project: ProjectConfig, out: Path, *, force: bool = False) -> list[Kit]:
    """Write ``out/coordinator/`` and ``out/site-N/`` for every site; returns the kits.  Every
    config is validated before anything is written: a project that cannot run leaves no kit."""
    if out.exists() and any(out.iterdir()) and not force:
        raise KitsExist(f"{out} is not empty: if it holds kits, their keys are in use (--force writes new keys and "
                        "configs over the kits' own files and deletes nothing else), else choose another --out")
    coordinator = Identity.generate()
    sites = {s.id: Identity.generate() for s in project.sites}
    peers = {i: k.public.hex() for i, k in sorted(sites.items())}
    fed = _fed_settings(project, peers)
    check_federation(validated(FederationConfig, fed, "project.yaml: federation"), "project.yaml: federation")
    settings = {e.id: _site_settings(project, e.id, coordinator.public, peers, e.data_path) for e in project.sites}
    for site, one in settings.items():
        validated(SiteConfig, one, f"project.yaml: site {site}")
    # --force writes over the kits' own files only: a run directory, a site's state (its privacy
    # ledger above all) or anything else in ``out`` is never deleted
    kits = [_coordinator_kit(project, out / "coordinator", coordinator, fed, peers)]
    for entry in project.sites:
        kits.append(_site_kit(project, entry.id, out / f"site-{entry.id}", sites[entry.id], coordinator.public,
                              settings[entry.id], entry.name))
    return kits


def _fed_settings(project: ProjectConfig, peers: dict[int, str]) -> dict[str, Any]:
    c = project.coordinator
    fed: dict[str, Any] = {"run_id": project.name, **project.federation,
                           "listen": {"host": c.listen_host or c.host, "port": c.port},
                           "identity_key": "coordinator.key",
                           "sites": [{"id": i, "public_key": k} for i, k in peers.items()]}
    fed.setdefault("run_dir", "runs")
    return fed


def _site_settings(project: ProjectConfig, site: int, coordinator: PublicIdentity, peers: dict[int, str],
                   data_path: str | None) -> dict[str, Any]:
    c = project.coordinator
    settings: dict[str, Any] = {
        "site_id": site,
        "identity_key": f"site-{site}.key",
        "coordinator": {"host": c.host, "port": c.port, "public_key": coordinator.hex()},
        "peers": peers,
        "state_dir": "state",
    }
    if data_path is not None:
        settings["data_path"] = data_path
    return settings


def _keys(folder: Path, name: str, identity: Identity) -> None:
    identity.save(folder / f"{name}.key")
    (folder / f"{name}.pub").write_text(identity.public.hex() + "\n")


def _coordinator_kit(project: ProjectConfig, folder: Path, identity: Identity, fed: dict[str, Any],
                     peers: dict[int, str]) -> Kit:
    _keys(folder, "coordinator", identity)
    c = project.coordinator
    path = folder / "fed.yaml"
    path.write_text(yaml.safe_dump(fed, sort_keys=False))
    names = {s.id: s.name for s in project.sites}
    table = "\n".join(f"| {i} | {names[i] or ''} | `{PublicIdentity.from_hex(k).fingerprint()}` |" for i, k in peers.items())
    (folder / "README.md").write_text(f"""# {project.name}: the coordinator's kit

Start the federation on this machine (it listens on {c.listen_host or c.host}:{c.port}):

```bash
asagiri-coordinator --config fed.yaml
```

`coordinator.key` is this coordinator's identity (mode 0600): it never leaves this machine.
The sites pin `coordinator.pub`, fingerprint `{identity.public.fingerprint()}`; read it to each
site's operator over a channel you trust (a phone call), and check theirs against this roster:

| site | name | fingerprint |
| --- | --- | --- |
{table}

The run's files (audit log, metrics, summary, checkpoint) go to `runs/`; `asagiri report runs/`
draws the report from them. docs/deployment.md has the rest.
""")
    return Kit("coordinator", folder, path, identity.public.fingerprint())


def _site_kit(project: ProjectConfig, site: int, folder: Path, identity: Identity, coordinator: PublicIdentity,
              settings: dict[str, Any], name: str | None) -> Kit:
    _keys(folder, f"site-{site}", identity)
    c = project.coordinator
    data_path = settings.get("data_path")
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    data = f"`{data_path}`" if data_path is not None else "not set yet: add `data_path:` to `site.yaml`"
    (folder / "README.md").write_text(f"""# {project.name}: site {site}{f' ({name})' if name else ''}

Start this site (it connects to {c.host}:{c.port}):

```bash
asagiri-client --site {site} --config site.yaml
```

- `site-{site}.key` is this site's identity (mode 0600): it never leaves this machine. Its
  fingerprint is `{identity.public.fingerprint()}`: read it to the coordinator's operator.
- The coordinator's key is pinned in `site.yaml`, fingerprint `{coordinator.fingerprint()}`:
  check it with the coordinator's operator over a channel you trust before the first run.
- Your data: {data}. The site trains on the whole of it; nothing the coordinator sends changes
  that. Your policy (`policy:` in `site.yaml`) decides what the site takes part in.
- `state/` keeps this site's privacy ledger, receipts and models between runs.
""")
    return Kit(f"site-{site}", folder, path, identity.public.fingerprint())
