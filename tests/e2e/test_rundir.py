"""The coordinator's run directory fills up, or turns read-only, under a running federation.

The run directory is a small tmpfs of its own (mounting one needs root with CAP_SYS_ADMIN: the
test skips, saying so, where it cannot).  After round 1 the test fills the disk, or remounts it
read-only.  The coordinator must stop with one clear line, no traceback, and records that still
agree (the audit log verifies, the checkpoint is the last recorded round's, no temporary file is
left); the sites wait for it; once there is room again, ``--resume`` finishes the run with every
round recorded exactly once.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from asagiri.observe.checkpoint import STAGED_NAME, load_checkpoint

pytestmark = pytest.mark.e2e


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; this test runs as an ordinary user")
    made = _mount("-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt))
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {made.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk) -> None:
    with open(disk / "filler", "wb", buffering=0) as fh:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def remount(disk, mode: str) -> None:
    for _ in range(600):  # EBUSY while the coordinator has a file open for writing (a minute at most)
        if _mount("-o", f"remount,{mode}", str(disk)).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"could not remount {disk} {mode}")


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_a_run_dir_that_fills_up_or_turns_read_only_stops_cleanly_then_resumes(fed_factory, small_disk, fault):
    run_dir = small_disk / "run"
    fed = fed_factory(fault, sites=3, rounds=3, overrides=[f"run_dir={run_dir}"])
    fed.start_coordinator()
    for s in (1, 2, 3):
        fed.start_site(s)
    fed.events(until="RoundCompleted")
    fill(small_disk) if fault == "full" else remount(small_disk, "ro")

    assert fed.coordinator.wait(timeout=120) == 1, fed.logs()
    log = (fed.root / "logs" / "coordinator.log").read_text()
    why = "No space left on device" if fault == "full" else "Read-only file system"
    assert f"error: cannot write {run_dir}" in log and why in log, log[-2000:]
    assert "Traceback" not in log, log[-3000:]
    # nothing torn: the signed log verifies to its last byte, the checkpoint is its last round's
    recorded = [a for a in fed.audit() if a["kind"] == "round_completed"]
    assert [a["round"] for a in recorded] == list(range(1, len(recorded) + 1)) and recorded
    _, _, state = load_checkpoint(run_dir / "checkpoint.npz")
    assert (state["round"], state["model_sha256"]) == (recorded[-1]["round"], recorded[-1]["model_sha256"])
    assert not list(run_dir.glob(".*.tmp"))
    assert all(p.poll() is None for p in fed.sites.values()), "a site gave up"

    (small_disk / "filler").unlink() if fault == "full" else remount(small_disk, "rw")
    fed.start_coordinator("--resume")
    fed.events()
    assert fed.wait_all() == {"coordinator": 0, "site-1": 0, "site-2": 0, "site-3": 0}, fed.logs()
    assert [r["round"] for r in fed.metrics()] == [1, 2, 3]
    assert [a["round"] for a in fed.audit() if a["kind"] == "round_completed"] == [1, 2, 3]
    assert not (run_dir / STAGED_NAME).exists()
