"""Fuzzing in CI: every kept input replayed (the seeds, and each crash the fuzzer found, now a
regression test), then a bounded coverage-guided session per target with atheris.

The session runs on a copy of the corpus, so CI never writes into the checkout; its length is
``ASAGIRI_FUZZ_SECONDS`` per target (default 4: about 30 s of fuzzing for the seven targets,
run side by side on the machine's cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .seeds import CORPUS, seeds
from .targets import TARGETS, encode_sequence, honest_round

ROOT = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("ASAGIRI_FUZZ_SECONDS", "4"))


def kept_inputs() -> list[tuple[str, Path]]:
    return [(t, f) for t in TARGETS for f in sorted((CORPUS / t).iterdir())]


def test_the_seeds_on_disk_are_the_ones_the_seeds_module_makes():
    for target, inputs in seeds().items():
        on_disk = sorted((CORPUS / target).glob("seed-*"), key=lambda p: int(p.name.split("-")[1]))
        assert [p.read_bytes() for p in on_disk] == inputs, f"{target}: run python -m tests.fuzz.seeds"


def test_every_target_has_a_corpus_and_the_honest_round_completes():
    assert all(any((CORPUS / t).glob("seed-*")) for t in TARGETS)
    to_site, from_sites = honest_round()
    assert [type(m).__name__ for _, m in to_site] == [
        "SecAggStart", "KeyRoster", "ShareDelivery", "ConsistencyCheck", "UnmaskRequest", "SumAnnounce", "SumProof"]
    assert encode_sequence(to_site) == (CORPUS / "secagg_client" / "seed-0").read_bytes()


@pytest.mark.parametrize(("target", "path"), kept_inputs(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_a_kept_input_is_handled(target, path):
    TARGETS[target](path.read_bytes())


def _atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _atheris(), reason="atheris is not installed (pip install atheris; .ci/run does)")
def test_a_bounded_fuzzing_session_per_target_finds_no_crash(tmp_path):
    """One session per target, as many at once as there are cores (the sessions are CPU-bound
    and independent): the same fuzzing time per target in a fraction of the wall time."""
    parallel = max(1, len(os.sched_getaffinity(0)))
    targets = list(TARGETS)
    for batch in (targets[i : i + parallel] for i in range(0, len(targets), parallel)):
        running = {target: _start_session(target, tmp_path / target) for target in batch}
        for target, proc in running.items():
            _, stderr = proc.communicate(timeout=SECONDS + 120)
            _check_session(target, tmp_path / target, proc.returncode, stderr)


def _start_session(target: str, work: Path) -> subprocess.Popen:
    corpus = work / "corpus"
    shutil.copytree(CORPUS / target, corpus)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fuzz.run", target, f"-max_total_time={SECONDS}", "-max_len=8192",
         f"-artifact_prefix={work}/", str(corpus)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _check_session(target: str, work: Path, code: int, stderr: str) -> None:
    crashes = sorted(work.glob("crash-*"))
    detail = "\n".join(line for line in stderr.splitlines() if "Instrumenting" not in line)[-3000:]
    assert code == 0 and not crashes, (
        f"{target}: the fuzzer found an input that fails: {[c.name for c in crashes]} (copy it into "
        f"tests/fuzz/corpus/{target}/ once fixed)\n{detail}")
    assert "Done" in stderr, f"{target}: {detail}"
