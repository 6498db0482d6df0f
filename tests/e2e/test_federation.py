"""End-to-end: coordinator and sites as separate processes over TCP on loopback."""

import signal
from pathlib import Path

import pytest

import asagiri

pytestmark = pytest.mark.e2e

# Two-site federations: each site's policy must accept a sum over two (its default floor is three).
TWO_SITES = {"min_participants": 2, "min_group": 2}


def test_three_sites_two_rounds(fed_factory):
    # Each end chunks tensors its own way (SPEC §4): 1 KiB at the coordinator, three other sizes at the sites.
    chunks = {1: {"chunk_bytes": 4096}, 2: {"chunk_bytes": 1 << 20}, 3: {"chunk_bytes": 1500}}
    fed = fed_factory(sites=3, rounds=2, overrides=["chunk_bytes=1024"], site_settings=chunks)
    events, codes = fed.run([1, 2, 3])
    assert codes == {"coordinator": 0, "site-1": 0, "site-2": 0, "site-3": 0}, fed.logs()
    rounds = fed.metrics()
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["participants"] == [1, 2, 3] and r["dropped"] == []
        assert set(r["site_auc"]) == {"1", "2", "3"} and 0.0 <= r["auc"] <= 1.0
        assert r["duration_s"] > 0
    assert [e["record"]["round"] for e in events if e["event"] == "RoundCompleted"] == [1, 2]
    assert [e["event"] for e in events][-2:] == ["TestScored", "FederationEnded"]
    fed.audit()  # the chain and every signature verify
    summary = fed.summary()
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert (fed.root / "checkpoint.npz").exists()


def test_site_killed_mid_round_round_completes_with_k_survivors(fed_factory):
    # Round 2 sums two sites: their policy has to allow it (the default floor is three).
    fed = fed_factory(sites=3, rounds=2, overrides=["min_clients=2"], site_policy=TWO_SITES, batches=False)
    fed.start_coordinator()
    fed.start_site(1)
    fed.start_site(2)
    victim = fed.start_site(3, "--kill-at", "fit:2")
    fed.events()
    assert fed.coordinator.wait(timeout=120) == 0, fed.logs()
    assert victim.wait(timeout=10) == -signal.SIGKILL
    r1, r2 = fed.metrics()
    assert r1["participants"] == [1, 2, 3]
    # With three participants the survivor-list quorum needs all three (it counts one colluder),
    # so the attempt site 3 left aborts, and the retry completes without it.
    assert r2["participants"] == [1, 2] and r2["attempt"] == 2 and r2["selected"] == [1, 2], r2
    assert fed.summary()["rounds_completed"] == 2


def test_fewer_than_k_aborts_then_retries_when_the_site_returns(fed_factory):
    fed = fed_factory(sites=3, rounds=1, overrides=["min_clients=3", "max_round_attempts=2"])
    fed.start_coordinator()
    fed.start_site(1)
    fed.start_site(2)
    fed.start_site(3, "--kill-at", "fit:1")
    aborted = fed.events(until="RoundAborted")[-1]
    assert (aborted["event"], aborted["round"], aborted["attempt"]) == ("RoundAborted", 1, 1), fed.logs()
    assert aborted["selected"] == [1, 2, 3] and aborted["cause"] == "too_few_sites", aborted
    assert "fewer than min_clients=3" in aborted["reason"], aborted
    assert fed.metrics() == []  # nothing was aggregated below k
    fed.start_site(3)  # the site comes back; the round is retried with all three
    fed.events()
    assert fed.coordinator.wait(timeout=120) == 0, fed.logs()
    [r1] = fed.metrics()
    assert r1["attempt"] == 2 and r1["participants"] == [1, 2, 3]
    rounds = [(a["round"], a["attempt"], a["kind"]) for a in fed.audit() if a["kind"].startswith("round_")]
    assert rounds == [(1, 1, "round_aborted"), (1, 2, "round_completed")]


def test_coordinator_killed_then_resumed_finishes_remaining_rounds(fed_factory):
    fed = fed_factory(sites=2, rounds=3, site_policy=TWO_SITES)
    fed.start_coordinator("--crash-at", "round_done:1")
    fed.start_site(1)
    fed.start_site(2)
    assert fed.coordinator.wait(timeout=120) == -signal.SIGKILL, fed.logs()
    assert [r["round"] for r in fed.metrics()] == [1]
    fed.start_coordinator("--resume")  # same port; the sites reconnect with backoff
    fed.events()
    codes = fed.wait_all()
    assert codes == {"coordinator": 0, "site-1": 0, "site-2": 0}, fed.logs()
    assert [r["round"] for r in fed.metrics()] == [1, 2, 3]
    audit = fed.audit()  # one chain across the crash: the resumed coordinator continued it
    assert [a["round"] for a in audit if a["kind"] == "round_completed"] == [1, 2, 3]
    starts = [(a["first_round"], a["resumed"]) for a in audit if a["kind"] == "run_started"]
    assert starts == [(1, False), (2, True)]
    assert fed.summary()["rounds_completed"] == 3


def test_fresh_start_over_an_existing_run_is_refused(fed_factory):
    fed = fed_factory(sites=2, rounds=1, site_policy=TWO_SITES)
    fed.start_coordinator()
    fed.start_site(1)
    fed.start_site(2)
    fed.events()
    assert fed.wait_all()["coordinator"] == 0
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "asagiri.cli.coordinator", "--config", str(fed.fed_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_sigterm_stops_the_coordinator_cleanly_and_resume_continues(fed_factory):
    fed = fed_factory(sites=2, rounds=4, site_policy=TWO_SITES)
    fed.start_coordinator()
    fed.start_site(1)
    fed.start_site(2)
    fed.events(until="RoundCompleted")
    fed.coordinator.send_signal(signal.SIGTERM)
    assert fed.coordinator.wait(timeout=30) == 130, fed.logs()
    done = [r["round"] for r in fed.metrics()]
    assert done and done == list(range(1, len(done) + 1)) and len(done) < 4
    # The sites were told the stop is not final: they keep waiting to reconnect.
    assert all(p.poll() is None for p in fed.sites.values())
    fed.start_coordinator("--resume")
    fed.events()
    assert fed.wait_all() == {"coordinator": 0, "site-1": 0, "site-2": 0}, fed.logs()
    assert [r["round"] for r in fed.metrics()] == [1, 2, 3, 4]


def test_readme_demo_on_bundled_chest_xrays_reaches_test_auc_above_085(tmp_path):
    """README's main job, as a user runs it (the demo recipe, examples/demo.yaml): real images,
    secure aggregation on, 4 site processes, 3 rounds."""
    import json
    import subprocess
    import sys

    out = tmp_path / "demo"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "asagiri.cli.main", "demo", "--config", str(root / "examples" / "demo.yaml"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary: status=completed rounds=3/3" in proc.stdout
    assert (out / "report" / "report.html").exists() and f"report: {out / 'report' / 'report.html'}" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_examples"] == 624 and summary["test_sites"] == [1, 2, 3, 4]
    assert summary["test_auc"] > 0.85, summary
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["secure_aggregation"] for r in records)


def test_demo_gives_its_sites_the_data_file_named_on_the_command_line(tmp_path):
    """`--set data.path=FILE` (relative to where it is typed) reaches every site process: before,
    only the coordinator got it and no site could load its data."""
    import shutil
    import subprocess
    import sys

    import yaml

    shutil.copy(Path(asagiri.__file__).parent / "data" / "bundled" / "pneumoniamnist.npz", tmp_path / "xrays.npz")
    proc = subprocess.run([sys.executable, "-m", "asagiri.cli.main", "demo", "--sites", "3", "--rounds", "1",
                           "--out", "run", "--set", "data.dataset=medmnist", "--set", "data.path=xrays.npz",
                           "--set", "model.width=8"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary: status=completed rounds=1/1" in proc.stdout
    site = yaml.safe_load((tmp_path / "run" / "sites" / "site-1.yaml").read_text())
    assert site["data_path"] == str(tmp_path / "xrays.npz")


def test_a_failed_site_process_is_named_with_its_own_last_error_line(tmp_path, capsys):
    import subprocess
    import sys

    from asagiri.cli.demo import _report_failed_sites

    (tmp_path / "site-1.log").write_text("")
    (tmp_path / "site-2.log").write_text("Traceback (most recent call last):\n  ...\n"
                                          "FileNotFoundError: /data/x.npz: no such file\n\n")
    ok = subprocess.Popen([sys.executable, "-c", "pass"])
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    ok.wait()
    failed.wait()
    _report_failed_sites([ok, failed], tmp_path)
    err = capsys.readouterr().err
    assert "site 1" not in err
    assert "site 2 exited with code 2: FileNotFoundError: /data/x.npz: no such file" in err


def test_a_site_that_refused_the_run_is_named_with_its_own_reason(tmp_path, capsys):
    """The coordinator hears only the rule (``setup``); the demo shows the site's own reason."""
    from asagiri.cli.demo import _report_refusing_sites

    (tmp_path / "site-2.log").write_text(
        "2026-12-06 site-2 ERROR asagiri.client.runtime: SiteWorker failed: FileNotFoundError: /x.npz\n"
        "2026-12-06 site-2 WARNING asagiri.policy: refused (setup): the run cannot be set up at this site: "
        "FileNotFoundError: /x.npz\n2026-12-06 site-2 INFO asagiri.client.runtime: heartbeat\n")
    _report_refusing_sites({2: "setup"}, tmp_path)
    err = capsys.readouterr().err
    assert "site 2 refused the run (setup): " in err and "refused (setup): the run cannot be set up" in err
    assert "heartbeat" not in err


def test_a_site_still_running_after_the_end_is_stopped_and_does_not_fail_the_demo(capsys):
    """Issue 28: a dropped site still in its reconnect loop when the run completed made the demo
    report "did not finish within 3600s" and exit non-zero."""
    import subprocess
    import sys

    from asagiri.cli.demo import _wait_for_sites

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    _wait_for_sites([done, stuck], grace=2)
    assert done.returncode == 0 and stuck.returncode is not None
    err = capsys.readouterr().err
    assert "site 2 was still running 2s after the federation ended" in err and "site 1" not in err


def test_the_demo_says_what_privacy_the_sites_spent_or_that_they_did_not_say():
    """Issue 28: epsilon never reached the operator's console; now the demo's summary says it
    whenever the sites report it, and says plainly when they do not."""
    from asagiri.cli.demo import privacy_line
    from asagiri.config import FederationConfig

    dp = FederationConfig.model_validate({"dp": {"enabled": True, "target_epsilon": 8.0}})
    assert privacy_line(FederationConfig(), {"epsilon": {}}) is None
    assert "did not report epsilon" in privacy_line(dp, {"epsilon": {}})
    assert privacy_line(dp, {"epsilon": {"2": 7.5, "10": 7.25}}) == \
        "privacy: epsilon spent site 2 7.500, site 10 7.250 (target 8, delta 1e-05)"


def test_the_dp_recipe_through_the_demo_reaches_all_its_rounds_within_its_budget(tmp_path):
    """Issue 28: the DP recipe as a user runs it.  Before, an aborted attempt of round 1 was
    charged to every ledger and the run stopped at 14 of 15 rounds; epsilon was only in the sites'
    logs.  Now every round runs, each site logs epsilon after each round it trains, the console
    shows the largest after each round, and the summary every site's, all within the target."""
    import json
    import subprocess
    import sys

    out = tmp_path / "dp"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "asagiri.cli.main", "demo", "--config",
                           str(root / "examples" / "dp-chest-xray.yaml"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary: status=completed rounds=15/15" in proc.stdout, proc.stdout
    shown = [float(line.split("epsilon<=")[1]) for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert len(shown) == 15 and shown == sorted(shown) and 0 < shown[0] and shown[-1] <= 8.0, proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["epsilon"], key=int) == ["1", "2", "3", "4"]
    assert all(0 < e <= 8.0 for e in summary["epsilon"].values()), summary["epsilon"]
    assert "privacy: epsilon spent site 1 " in proc.stdout and "(target 8," in proc.stdout
    for site in (1, 2, 3, 4):
        spent = [float(line.split("epsilon=")[1].split(" ")[0]) for line in
                 (out / "logs" / f"site-{site}.log").read_text().splitlines() if "privacy spent: epsilon=" in line]
        assert len(spent) >= 15 and spent[-1] <= 8.0, (site, spent)
        assert spent[-1] >= summary["epsilon"][str(site)] - 1e-3, (site, spent, summary["epsilon"])


def test_a_multi_class_run_on_dermamnist_through_the_cli_is_scored_by_macro_auc(tmp_path):
    """Issue 29: seven classes end to end through `asagiri demo`, the pooled test set scored by
    the macro one-vs-rest AUC (``scores.auc_score``, checked against its definition in
    tests/test_scores.py)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "asagiri.cli.main", "demo", "--sites", "3", "--rounds", "1",
                           "--out", str(tmp_path / "derma"), "--set", "data.dataset=dermamnist",
                           "--set", "model.width=8"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "derma" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test_examples"] == 2005, summary
    assert 0.5 < summary["test_auc"] <= 1.0 and set(summary["test_site_auc"]) == {"1", "2", "3"}, summary
