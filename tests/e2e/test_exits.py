"""Issue 28: exits that tell the truth, from real processes (docs/deployment.md, "Exit codes")."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from asagiri.config import ProjectConfig
from asagiri.provision import provision

pytestmark = pytest.mark.e2e


def kits(tmp_path, port: int):
    project = ProjectConfig.model_validate({"name": "exits", "coordinator": {"port": port},
                                            "federation": {"rounds": 1, "timeouts": {"wait_for_sites": 5}},
                                            "sites": [{"id": i} for i in (1, 2, 3)]})
    provision(project, tmp_path / "kits")
    return tmp_path / "kits"


def test_a_taken_port_is_an_error_not_a_success(tmp_path):
    """A red-team / newcomer finding: with its port taken the coordinator exited 0 and printed the
    path of a summary it never wrote."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "asagiri.cli.coordinator", "--config",
                              str(kits(tmp_path, port) / "coordinator" / "fed.yaml")],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert "summary:" not in out.stdout
    assert not (tmp_path / "kits" / "coordinator" / "runs" / "summary.json").exists()


def test_a_federation_no_site_joins_fails_with_3(tmp_path):
    """Nobody comes: after wait_for_sites the run fails, one line on stderr, exit code 3."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "asagiri.cli.coordinator", "--config",
                          str(kits(tmp_path, port) / "coordinator" / "fed.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "federation stopped at round 1" in out.stderr + out.stdout
