"""Issue 28: interrupting the test suite leaves no coordinator or site process behind
(``tests/conftest.py``, and the launcher's children dying with their parent)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

ROOT = Path(__file__).resolve().parents[2]
DEMO_TEST = "tests/e2e/test_federation.py::test_readme_demo_on_bundled_chest_xrays_reaches_test_auc_above_085"


def marked(mark: str) -> dict[int, str]:
    """Live processes whose environment carries ``mark``, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"ASAGIRI_TEST_MARK={mark}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_suite_leaves_no_process_behind(tmp_path, how):
    """An inner pytest runs README's demo test (pytest -> asagiri demo -> coordinator and 4 sites);
    once its sites run, the inner pytest alone is signalled, as a CI timeout or a Ctrl-C sent to
    one process does.  When it has exited, nothing it started may be left."""
    mark = uuid.uuid4().hex
    log = open(tmp_path / "inner.log", "wb")  # noqa: SIM115 - closed below
    inner = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                              str(tmp_path / "inner"), DEMO_TEST], cwd=ROOT, stdout=log, stderr=log,
                             env={**os.environ, "ASAGIRI_TEST_MARK": mark})
    try:
        deadline = time.monotonic() + 300
        while not any("asagiri.cli.client" in cmd for cmd in marked(mark).values()):
            assert inner.poll() is None, (tmp_path / "inner.log").read_text()
            assert time.monotonic() < deadline, "the demo's sites never started"
            time.sleep(0.2)
        os.kill(inner.pid, how)
        inner.wait(timeout=120)
        assert marked(mark) == {}, (tmp_path / "inner.log").read_text()
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait()
        log.close()
