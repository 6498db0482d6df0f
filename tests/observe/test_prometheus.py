"""The shipped Prometheus config and Grafana dashboard, against a real Prometheus (Debian's
`prometheus` package, which .ci/run installs): it scrapes a running federation of real processes,
and every PromQL expression of the dashboard returns data through Prometheus' HTTP API."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

import asagiri

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.e2e.harness import Federation, free_port  # noqa: E402

pytestmark = pytest.mark.e2e

GRAFANA = Path(asagiri.__file__).parent / "observe" / "grafana"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
NO_PROMETHEUS = "Debian's prometheus package is not installed here (.ci/run installs it: apt-get install prometheus)"


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((GRAFANA / "asagiri.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_the_dashboard_is_complete_json_with_a_query_on_every_panel():
    dash = json.loads((GRAFANA / "asagiri.json").read_text())
    assert dash["uid"] and dash["panels"]
    assert all(p["targets"] and all(t["expr"].strip() for t in p["targets"]) for p in dash["panels"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)
def test_promtool_accepts_the_shipped_scrape_config():
    proc = subprocess.run([PROMTOOL, "check", "config", str(GRAFANA / "prometheus.yml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
def test_prometheus_scrapes_a_running_federation_and_every_dashboard_query_has_data(tmp_path):
    metrics_port, site_port, prom_port = free_port(), free_port(), free_port()
    # DP with sites that report epsilon, so the privacy panels have series too; long fit and
    # heartbeat timeouts keep the coordinator up while a site is paused (below).
    fed = Federation(tmp_path / "run", sites=3, rounds=6, overrides=[
        f"metrics_port={metrics_port}", "dp.enabled=true", "timeouts.fit=120", "timeouts.heartbeat_timeout=120",
    ], site_policy={"report_privacy": True}, site_settings={1: {"metrics_port": site_port}})
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())  # the shipped file, pointed at this run
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_port}"]
    config["scrape_configs"][1]["static_configs"][0]["targets"] = [f"127.0.0.1:{site_port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=log, stderr=log)
    paused = None
    try:
        fed.start_coordinator()
        for site in (1, 2, 3):
            fed.start_site(site)
        for _ in range(2):
            fed.events(until="RoundCompleted")
        paused = fed.sites[3]
        os.kill(paused.pid, signal.SIGSTOP)  # round 3 now waits for it: the coordinator stays up
        missing: list[tuple[str, str]] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                missing = [(title, e) for title, e in dashboard_queries() if not query(prom_port, e)]
                for after_round_2 in ("asagiri_rounds_completed_total >= 2", "asagiri_site_rounds_trained_total >= 2"):
                    if not query(prom_port, after_round_2):
                        missing.append(("a scrape after round 2", after_round_2))
            except OSError:  # Prometheus still starting
                missing = [("prometheus", "not answering")]
            if not missing:
                break
            time.sleep(1)
        assert missing == [], f"panels without data: {missing}\n{(tmp_path / 'prometheus.log').read_text()[-2000:]}"
        [up] = query(prom_port, 'up{job="asagiri-coordinator"}')
        assert up["value"][1] == "1"
        # the figures are the run's: two rounds completed, three sites connected, epsilon reported
        assert float(query(prom_port, "asagiri_rounds_completed_total")[0]["value"][1]) == 2
        assert float(query(prom_port, "asagiri_connected_sites")[0]["value"][1]) == 3
        assert {r["metric"]["site"] for r in query(prom_port, "asagiri_site_epsilon")} == {"1", "2", "3"}
        # site 1's own endpoint: its training speed, and the epsilon it spent, at least what it reported
        # after round 2 (it may already have trained round 3, which waits for the paused site)
        [site_eps] = query(prom_port, 'asagiri_site_epsilon_spent{job="asagiri-site"}')
        [reported] = query(prom_port, 'asagiri_site_epsilon{site="1"}')
        assert float(site_eps["value"][1]) >= float(reported["value"][1]) * (1 - 1e-9) > 0
        assert float(query(prom_port, "asagiri_site_train_samples_per_second")[0]["value"][1]) > 0
        assert query(prom_port, "asagiri_site_train_step_seconds_count")[0]["value"][1] in ("2", "3")
        assert query(prom_port, 'asagiri_site_refusals_total{rule="privacy_budget"}')
    finally:
        if paused is not None:
            os.kill(paused.pid, signal.SIGCONT)
        fed.kill_all()
        prom.terminate()
        prom.wait(timeout=30)
        log.close()


def documented_commands() -> list[str]:
    """The bash block of docs/observability.md that starts Prometheus and the demo, line by line."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    block = next(b for b in text.split("```bash\n")[1:] if "prometheus --config.file" in b).split("```")[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
def test_the_documented_commands_work_as_written(tmp_path):
    """Issue 28: docs/observability.md's commands, run as written (the demo's line gets a run
    directory and long timeouts, so that a paused site keeps its coordinator up): Prometheus binds
    to localhost only and scrapes the live demo."""
    import socket

    from tests.e2e.test_interrupt import marked

    for port in (9090, 9464):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port}, which the documented commands use, is taken on this machine")
    setup, check, start_prometheus, start_demo = documented_commands()
    assert start_prometheus.startswith("prometheus ") and "--web.listen-address=127.0.0.1:" in start_prometheus
    assert start_demo.startswith("asagiri demo ")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    # the documented lines, with Prometheus run in the foreground of its own process instead of `&`
    prom = subprocess.Popen(["bash", "-euc", f"{setup}\n{check}\nexec {start_prometheus.split('&')[0]}"],
                            cwd=tmp_path, env=env, stdout=log, stderr=log)
    mark = uuid.uuid4().hex
    demo = subprocess.Popen(["bash", "-c", f"exec {start_demo.split('#')[0]} --out demo --set "
                             "timeouts.heartbeat_timeout=600 --set timeouts.fit=600"], cwd=tmp_path,
                            env={**env, "ASAGIRI_TEST_MARK": mark}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    paused: list[int] = []
    try:
        seen = []
        for line in demo.stdout:
            seen.append(line)
            if line.startswith("round 1/"):
                break
        paused = [pid for pid, cmd in marked(mark).items() if "asagiri.cli.client" in cmd and "--site 1 " in cmd]
        assert len(paused) == 1, "".join(seen)
        os.kill(paused[0], signal.SIGSTOP)  # round 2 waits for it: the coordinator stays up
        deadline = time.monotonic() + 120
        while True:
            try:
                if query(9090, "asagiri_rounds_completed_total >= 1"):
                    break
            except OSError:  # Prometheus still starting
                pass
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(1)
        # Prometheus listens on the loopback address only
        listening = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        local = {entry[1] for entry in listening if entry[3] == "0A"}  # state 0A: LISTEN
        assert f"0100007F:{9090:04X}" in local and f"00000000:{9090:04X}" not in local
        assert (tmp_path / "prometheus-data").is_dir()
        os.kill(paused.pop(), signal.SIGCONT)
        seen.extend(demo.stdout)
        assert demo.wait(timeout=600) == 0, "".join(seen)
        assert "summary: status=completed rounds=2/2" in "".join(seen)
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        if demo.poll() is None:
            demo.terminate()
            demo.wait(timeout=60)
        prom.terminate()
        prom.wait(timeout=30)
        log.close()
