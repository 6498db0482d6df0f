"""Issue 28: exits that tell the truth, from real processes (docs/deployment.md, "Exit codes")."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from asagiri.config import ProjectConfig
from asagiri.data.loaders import bundled_path
from asagiri.provision import provision

pytestmark = pytest.mark.e2e

BUNDLED = bundled_path("pneumoniamnist.npz")


def kits(tmp_path, port: int, wait_for_sites: float = 600):
    project = ProjectConfig.model_validate({"name": "exits", "coordinator": {"port": port},
                                            "federation": {"rounds": 1, "timeouts": {"wait_for_sites": wait_for_sites}},
                                            "sites": [{"id": i, "data_path": str(BUNDLED)} for i in (1, 2, 3)]})
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
    # the metrics port taken (a newcomer's finding: a traceback and exit code 1)
    import yaml

    fed = tmp_path / "kits" / "coordinator" / "fed.yaml"
    with socket.socket() as probe, socket.socket() as taken:
        probe.bind(("127.0.0.1", 0))
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        settings = yaml.safe_load(fed.read_text())
        fed.write_text(yaml.safe_dump({**settings, "listen": {"host": "127.0.0.1", "port": probe.getsockname()[1]},
                                       "metrics_port": metrics_port}))
        probe.close()
        out = subprocess.run([sys.executable, "-m", "asagiri.cli.coordinator", "--config", str(fed)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"error: fed.yaml: cannot listen on 127.0.0.1:{metrics_port}"
                                                    " (metrics_port): Address already in use. Free the port or choose "
                                                    "another"), out.stderr
    assert "Traceback" not in out.stderr


def test_a_federation_no_site_joins_fails_with_3(tmp_path):
    """Nobody comes: after wait_for_sites the run fails, one line on stderr, exit code 3."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "asagiri.cli.coordinator", "--config",
                          str(kits(tmp_path, port, wait_for_sites=5) / "coordinator" / "fed.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "federation stopped at round 1" in out.stderr + out.stdout


def check(config) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asagiri.cli.main", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


def test_preflight_names_each_problem_in_one_line_and_the_client_stops_before_connecting(tmp_path):
    """``asagiri check``: a site's key, data and coordinator (reachable, holding the pinned key,
    enrolling the site), the coordinator's key and ports; each problem one line, exit 2."""
    import os

    import yaml

    from asagiri.launcher import start_coordinator

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = kits(tmp_path, port)
    site = root / "site-1" / "site.yaml"
    offline = check(site)
    assert offline.returncode == 2 and f"cannot reach 127.0.0.1:{port}" in offline.stderr, offline.stderr
    log = open(tmp_path / "coordinator.log", "wb")  # noqa: SIM115 - closed below
    coordinator, _, _ = start_coordinator(root / "coordinator" / "fed.yaml", stdout=log, stderr=log)
    try:
        ok = check(site)
        assert ok.returncode == 0 and "answered with the pinned key and enrols this site" in ok.stdout, ok.stderr
        settings = yaml.safe_load(site.read_text())
        cases = {
            "wrong coordinator key": ({"coordinator": {**settings["coordinator"], "public_key": "ab" * 32}},
                                      "does not hold the pinned key"),
            "unenrolled site": ({"site_id": 9, "identity_key": "site-9.key"}, "refused this site"),
            "public key as identity": ({"identity_key": "site-1.pub"}, "is a public key file"),
            "missing data": ({"data_path": "/nonexistent/x.npz"}, "does not exist"),
            "no data": ({"data_path": None}, "data_path is not set"),
        }
        from asagiri.wire.crypto import Identity

        Identity.generate().save(root / "site-1" / "site-9.key")
        running = {}
        for name, (change, _) in cases.items():  # side by side: each is a process start or two
            variant = root / "site-1" / f"{name.replace(' ', '-')}.yaml"
            variant.write_text(yaml.safe_dump({**settings, **change}))
            running[name] = subprocess.Popen([sys.executable, "-m", "asagiri.cli.main", "check", "--config",
                                              str(variant)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (_, why) in cases.items():
            stdout, stderr = running[name].communicate(timeout=120)
            assert running[name].returncode == 2 and why in stderr, (name, stdout, stderr)
            assert all(line.startswith("error: ") for line in stderr.strip().splitlines()), (name, stderr)
        # the coordinator's own port is taken, by itself: its preflight says so
        taken = check(root / "coordinator" / "fed.yaml")
        assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
        # an unenrolled site is refused at every try, and its log names the fix, with its own key
        unenrolled = client(9, root / "site-1" / "unenrolled-site.yaml", "reconnect.give_up_s=3")
        fingerprint = Identity.load(root / "site-1" / "site-9.key").public.fingerprint()
        assert unenrolled.returncode == 1, unenrolled.stderr
        assert "site 9 is not enrolled" in unenrolled.stderr and f"adds it with key {fingerprint} to fed.yaml" \
            in unenrolled.stderr, unenrolled.stderr
        assert "no coordinator for 3s (last: it refused this site" in unenrolled.stderr, unenrolled.stderr
    finally:
        coordinator.kill()
        coordinator.wait()
        log.close()
    # the client runs the same local checks at start-up and stops before connecting: exit 2
    missing = client(1, root / "site-1" / "missing-data.yaml")
    assert missing.returncode == 2 and "/nonexistent/x.npz" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr
    # no coordinator for give_up_s: exit 1, saying so
    gone = client(1, site, "reconnect.give_up_s=2")
    assert gone.returncode == 1 and "no coordinator for 2s (last: 127.0.0.1:" in gone.stderr and "giving up" in gone.stderr, gone.stderr
    # re-provisioned: a new key over a state signed by the old one (a traceback, before)
    os.makedirs(root / "site-1" / "state", exist_ok=True)
    from asagiri.signedlog import RECEIPT_DOMAIN, SignedLog

    SignedLog(root / "site-1" / "state" / "receipts.jsonl", Identity.generate(), domain=RECEIPT_DOMAIN).append(
        "receipt")
    rekeyed = client(1, site)
    assert rekeyed.returncode == 2 and "signed by another key" in rekeyed.stderr and "move the file aside" in \
        rekeyed.stderr and "Traceback" not in rekeyed.stderr, rekeyed.stderr
    os.chmod(root / "site-1" / "site-1.key", 0o644)
    started = client(1, site)
    assert started.returncode == 2 and "chmod 600" in started.stderr, started.stderr


def client(site: int, config, *overrides: str) -> subprocess.CompletedProcess:
    sets = [arg for o in overrides for arg in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "asagiri.cli.client", "--site", str(site), "--config", str(config),
                           *sets], capture_output=True, text=True, timeout=300)


def started_and_interrupted(argv: list[str], ready: str, how=signal.SIGINT, **kwargs) -> tuple[int, str]:
    """Start ``argv``, wait for ``ready`` in its output (stdout and stderr together), send ``how``
    to that process alone; its exit code and output.  It starts with SIGINT's default action, as a
    command at a terminal does: a suite run as a background job of a non-interactive shell
    (``... &``) hands its children SIGINT ignored, and a program rightly keeps an inherited
    ignore, so the Ctrl-C would never arrive."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_sigint, **kwargs)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if ready in line:
                proc.send_signal(how)
                break
        seen.extend(proc.stdout)
        return proc.wait(timeout=120), "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_site_interrupted_exits_130(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    site = kits(tmp_path, port) / "site-1" / "site.yaml"
    code, out = started_and_interrupted([sys.executable, "-m", "asagiri.cli.client", "--site", "1", "--config",
                                         str(site)], ready="not reachable")
    assert code == 130 and "SIGINT: stopping" in out, out


def demo(tmp_path, *args: str) -> list[str]:
    return [sys.executable, "-m", "asagiri.cli.main", "demo", "--out", str(tmp_path / "demo"), "--sites", "3",
            "--rounds", "1", "--set", "model.width=8", *args]


def test_demo_exit_codes_refused_unfinished_and_interrupted(tmp_path):
    """``asagiri demo``: 3 when every site refuses the run (each site's own reason printed), 1 when
    it does not finish in --timeout, 130 when interrupted; each leaves no process behind."""
    from tests.e2e.test_interrupt import marked

    refused = subprocess.run(demo(tmp_path / "refused", "--set", "dp.enabled=true", "--set",
                                  "dp.target_epsilon=50"), capture_output=True, text=True, timeout=600)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "status=refused_by_sites" in refused.stdout
    assert all(f"site {s} refused the run (max_epsilon)" in refused.stderr for s in (1, 2, 3)), refused.stderr
    slow = subprocess.run(demo(tmp_path / "slow", "--timeout", "2"), capture_output=True, text=True, timeout=600)
    assert slow.returncode == 1 and "error: the demo did not finish within 2s" in slow.stderr, slow.stderr
    import os
    import uuid

    for how in (signal.SIGINT, signal.SIGTERM):  # sent while it starts its sites: it used to go on to the end
        mark = uuid.uuid4().hex
        code, out = started_and_interrupted(demo(tmp_path / how.name, "--rounds", "50"), ready="listening on",
                                            how=how, env={**os.environ, "ASAGIRI_TEST_MARK": mark})
        assert code == 130 and "summary:" not in out, (how.name, out)
        assert marked(mark) == {}
