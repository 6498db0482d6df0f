"""The portable model history (issue 27, part 3; SPEC §6.9): a run's models replayed from ``W_0``
through its verified sums by someone who holds only the run directory and the keys
(``asagiri audit verify --models``), and every way of changing what the directory holds is
reported."""

from __future__ import annotations

import json
import subprocess
import sys

import anyio
import numpy as np
import pytest

from asagiri.local import lay_out, run_local
from asagiri.observe.checkpoint import load_checkpoint
from asagiri.params import params_digest
from asagiri.signedlog import read_log
from asagiri.site.replay import replay_models
from asagiri.wire.codec import decode, encode

FAST = ["data.dataset=synthetic", "data.synthetic_samples=192", "data.partition.scheme=iid", "model.width=8",
        "train.local_steps=5", "timeouts.heartbeat_interval=1", "timeouts.heartbeat_timeout=10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("history")
    cfg, sites = lay_out(root, sites=3, rounds=3, overrides=[*FAST, "strategy.name=fedavgm",
                                                             "strategy.server_momentum=0.5"])
    anyio.run(run_local, cfg, sites)
    return root


def copy_of(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "copy")
    return tmp_path / "copy"


def test_the_whole_history_replays_to_the_final_model(run):
    result = replay_models(run, read_log(run / "audit.jsonl"))
    assert result.problems == [] and result.rounds == [1, 2, 3]
    final, _, _ = load_checkpoint(run / "checkpoint.npz")
    assert result.final_sha256 == params_digest(final)  # FedAvgM's momentum included


def test_the_command_reports_the_replay(run):
    out = subprocess.run([sys.executable, "-m", "asagiri.cli.main", "audit", "verify", str(run), "--key",
                          str(run / "keys" / "coordinator.pub"), "--models"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rounds 1-3 (3) replayed from W_0" in out.stdout


def _mangle_sum(path, index: int = 0) -> None:
    rec = decode(path.read_bytes(), max_payload_bytes=1 << 24)
    total = rec.total["s"].copy()
    total[index] += np.array(1, dtype=total.dtype)
    path.write_bytes(encode(type(rec)(rec.round, rec.attempt, rec.participants, rec.config, rec.survivors,
                                      {"s": total}, rec.vouches)))


def test_a_changed_sum_a_missing_one_or_another_spec_is_reported(run, tmp_path):
    cases = {}
    changed = copy_of(run, tmp_path / "sum")
    _mangle_sum(changed / "sums" / "round-000002.msg")
    cases["sum"] = changed
    missing = copy_of(run, tmp_path / "missing")
    (missing / "sums" / "round-000003.msg").unlink()
    cases["missing"] = missing
    spec = copy_of(run, tmp_path / "spec")
    saved = json.loads((spec / "spec.json").read_text())
    saved["spec"]["train"]["lr"] = 0.5
    (spec / "spec.json").write_text(json.dumps(saved))
    cases["spec"] = spec
    keys = copy_of(run, tmp_path / "keys")
    saved = json.loads((keys / "spec.json").read_text())
    saved["sites"]["1"] = saved["sites"]["2"]  # a vouch then does not verify under the key named
    (keys / "spec.json").write_text(json.dumps(saved))
    cases["keys"] = keys
    found = {name: replay_models(root, read_log(root / "audit.jsonl")) for name, root in cases.items()}
    assert found["sum"].rounds == [1] and "round 2" in found["sum"].problems[0]
    assert found["missing"].rounds == [1, 2] and "[3]" in found["missing"].problems[0]
    assert found["spec"].rounds == [] and "run_started" in found["spec"].problems[0]
    assert found["keys"].rounds == [] and "round 1" in found["keys"].problems[0]
