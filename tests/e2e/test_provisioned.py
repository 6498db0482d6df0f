"""Issue 28: a deployment from provisioned kits, as a hospital engineer would run it, on loopback.

``asagiri provision`` writes each party's kit from one project file; the coordinator and three
site processes start from their kits alone (no hex pasted by hand), each site on its own whole
data file, of three different sizes; the run completes, and each site's logged counts are its
file's, split for split."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from asagiri.config import load_federation, load_site
from asagiri.launcher import start_coordinator, start_site

pytestmark = pytest.mark.e2e

BUNDLED = Path(__file__).resolve().parents[2] / "asagiri" / "data" / "bundled" / "pneumoniamnist.npz"
SIZES = {1: (600, 80, 90), 2: (900, 120, 100), 3: (1500, 150, 200)}  # (train, val, test) per site


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_file(out: Path, site: int) -> Path:
    """The site's own data: a slice of the bundled chest X-rays, of this site's size."""
    rng = np.random.default_rng(site)
    path = out / f"hospital-{site}.npz"
    with np.load(BUNDLED) as src:
        arrays = {}
        for split, n in zip(("train", "val", "test"), SIZES[site], strict=True):
            pick = rng.choice(len(src[f"{split}_labels"]), size=n, replace=False)
            arrays[f"{split}_images"] = src[f"{split}_images"][pick]
            arrays[f"{split}_labels"] = src[f"{split}_labels"][pick]
    np.savez(path, **arrays)
    return path


def test_a_federation_from_provisioned_kits_trains_each_site_on_its_whole_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    project = {
        "name": "provisioned-study",
        "coordinator": {"host": "127.0.0.1", "port": free_port()},
        "federation": {"rounds": 1, "model": {"width": 8}, "data": {"dataset": "pneumoniamnist"},
                       "timeouts": {"wait_for_sites": 120}},
        "sites": [{"id": s, "name": f"hospital-{s}", "data_path": str(site_file(data, s))} for s in SIZES],
    }
    (tmp_path / "project.yaml").write_text(yaml.safe_dump(project))
    kits = tmp_path / "kits"
    out = subprocess.run([sys.executable, "-m", "asagiri.cli.main", "provision", str(tmp_path / "project.yaml"),
                          "--out", str(kits)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # every key's fingerprint is printed, and each kit's config pins the others' keys
    fed = load_federation(kits / "coordinator" / "fed.yaml")
    for s in SIZES:
        site = load_site(kits / f"site-{s}" / "site.yaml")
        assert site.peers == {e.id: e.public_key for e in fed.sites}
        assert (kits / f"site-{s}" / f"site-{s}.key").stat().st_mode & 0o077 == 0
        assert f"site-{s}" in out.stdout
    logs = {s: open(tmp_path / f"site-{s}.log", "wb") for s in SIZES}  # noqa: SIM115 - closed below
    coordinator_log = open(tmp_path / "coordinator.log", "wb")  # noqa: SIM115
    procs = []
    try:
        coordinator, _, port = start_coordinator(kits / "coordinator" / "fed.yaml", stdout=coordinator_log,
                                                 stderr=coordinator_log)
        procs.append(coordinator)
        assert port == project["coordinator"]["port"]
        procs += [start_site(kits / f"site-{s}" / "site.yaml", s, log=logs[s]) for s in SIZES]
        assert coordinator.wait(timeout=600) == 0, (tmp_path / "coordinator.log").read_text()
        for p in procs[1:]:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in (*logs.values(), coordinator_log):
            f.close()
    summary = yaml.safe_load((kits / "coordinator" / "runs" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1
    for s, (train, val, test) in SIZES.items():
        text = (tmp_path / f"site-{s}.log").read_text()
        assert f"site data: {train} train / {val} val / {test} test images (its own data, whole)" in text, text[-2000:]
