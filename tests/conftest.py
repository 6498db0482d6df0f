"""Shared fixtures, and the rule that a test run leaves no process behind.

End-to-end tests start coordinators and sites (often through ``asagiri demo``, a process that
starts processes).  Interrupting the suite (Ctrl-C, SIGTERM, a CI timeout's SIGTERM) used to
leave them running: an interrupted ``subprocess.run`` kills only its own child.  So, on Linux,
this process adopts every orphaned descendant (it is a child subreaper), and when the session
ends, however it ends, every descendant still alive is stopped (SIGTERM, then SIGKILL).
``tests/e2e/test_interrupt.py`` checks it against a real interrupted run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import pytest

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def anyio_backend():
    return "asyncio"


def pytest_configure(config: pytest.Config) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # SIGTERM ends the run as Ctrl-C does, so that pytest_sessionfinish below still runs
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_descendants()


def descendants(root: int) -> list[int]:
    """The live (not zombie) processes below ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_descendants(grace_s: float = 20.0) -> None:
    if not Path("/proc/self/stat").exists():
        return
    me = os.getpid()
    deadline = time.monotonic() + grace_s
    signalled: set[int] = set()
    while left := descendants(me):
        late = time.monotonic() > deadline
        for pid in left:
            if late or pid not in signalled:
                try:
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                except ProcessLookupError:
                    pass
                signalled.add(pid)
        _reap()
        time.sleep(0.1)
    _reap()


def _reap() -> None:
    """Collect the exit status of adopted orphans (our children only once their parent died)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
