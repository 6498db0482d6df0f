"""`asagiri report` on a real (in-memory) federation with DP and an attack report, opened in a real
headless browser (Debian's chromium, which .ci/run installs): no console errors, every plot drawn
with a non-zero size, and a screenshot in the test's folder."""

import json
import re
import shutil
import subprocess

import anyio
import pytest

from asagiri.cli.main import main
from asagiri.local import lay_out, run_local

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
NO_CHROMIUM = "no chromium here (.ci/run installs Debian's chromium: apt-get install chromium)"
PLOTS = ["auc", "epsilon", "stages", "participation", "label_mix", "attacks"]

# Appended to a copy of the report by the test only: records each plot's decoded and drawn size.
PROBE = """<script>
window.addEventListener('load', () => {
  const sizes = [...document.images].map(i => [i.closest('figure').id, i.naturalWidth, i.getBoundingClientRect().width,
                                               i.getBoundingClientRect().height]);
  document.body.dataset.plots = JSON.stringify(sizes);
});
</script></body>"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg, sites = lay_out(root, sites=3, rounds=2, site_extra={s: {"policy": {"report_privacy": True}} for s in (1, 2, 3)},
                         overrides=["data.dataset=synthetic", "data.synthetic_samples=192", "model.width=8",
                                    "train.local_steps=5", "dp.enabled=true", "timeouts.heartbeat_timeout=10"])
    anyio.run(lambda: run_local(cfg, sites))
    assert main(["attack", "mia", "--run", str(root), "--references", "2", "--out", str(root / "attacks")]) == 0
    return root


def test_the_report_has_every_plot_from_the_runs_own_records(run):
    assert main(["report", str(run)]) == 0
    out = run / "report"
    page = (out / "report.html").read_text()
    for name in PLOTS:
        assert (out / f"{name}.png").stat().st_size > 2000, name
        assert f'<figure id="{name}">' in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == len(PLOTS)  # self-contained
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # nothing fetched
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_sha256"] in page
    assert "global_all_sites" in page  # the attack results


def test_a_run_folder_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no run here" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_the_report_opens_in_a_headless_browser_without_errors_and_draws_every_plot(run, tmp_path):
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    report = tmp_path / "report" / "report.html"
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    opened = subprocess.run([*browser, "--enable-logging=stderr", "--v=0", "--dump-dom", report.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert opened.returncode == 0, opened.stderr[-2000:]
    console = [line for line in opened.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE))
    dom = subprocess.run([*browser, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-plots="([^"]*)"', dom)
    assert found, dom[-2000:]
    sizes = json.loads(found.group(1).replace("&quot;", '"'))
    assert [s[0] for s in sizes] == PLOTS
    assert all(natural > 0 and width > 0 and height > 0 for _, natural, width, height in sizes), sizes
    shot = tmp_path / "report.png"
    subprocess.run([*browser, "--window-size=1000,3000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000


def test_a_fedbn_runs_report_labels_the_pooled_auc_and_shows_each_sites_own(run, tmp_path):
    copy = tmp_path / "fedbn-run"
    shutil.copytree(run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary.update(personalised=True, test_auc=0.71, test_site_auc={"1": 0.906, "2": 0.854})
    (copy / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(copy)]) == 0
    page = (copy / "report" / "report.html").read_text()
    assert "test_auc (pooled over the sites&#x27; own models, each on its own scale)" in page
    assert "each site&#x27;s own FedBN model on its own test share" in page and "0.906" in page
