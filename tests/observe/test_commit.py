"""A round's records commit together: whichever write fails (or wherever the process dies), the
next process finds the checkpoint, ``metrics.jsonl`` and the audit log agreeing on the last
completed round, and nothing of a round that was not recorded.  The real disk-full and read-only
cases, with processes, are ``tests/e2e/test_rundir.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from asagiri.observe import recorder as recorder_module
from asagiri.observe.checkpoint import STAGED_NAME, load_checkpoint
from asagiri.observe.events import RoundCompleted, RunStarted
from asagiri.observe.metrics import CoordinatorMetrics
from asagiri.observe.recorder import Recorder
from asagiri.observe.runlog import trim_jsonl
from asagiri.params import params_digest
from asagiri.signedlog import SignedLog, read_log
from asagiri.wire.crypto import Identity

KEY = Identity.generate()


def recorder(run_dir) -> Recorder:
    return Recorder(run_dir, CoordinatorMetrics(CollectorRegistry()), run_id="r", rounds=3, identity=KEY,
                    config_sha256="0" * 64, console=False)


def completed(rnd: int) -> RoundCompleted:
    params = {"w": np.full(4, rnd, np.float32)}
    record = {"round": rnd, "attempt": 1, "participants": [1, 2], "dropped": [], "declined": {}, "duration_s": 1.0}
    return RoundCompleted(record, params, None, {"run_id": "r", "round": rnd, "history": [record]})


def failing(*_args, **_kw):
    raise OSError(28, "No space left on device", "somewhere")


# each write of a round's records, in the order they happen
STEPS = {
    "staging the checkpoint": (recorder_module, "save_checkpoint"),
    "the metrics line": (recorder_module, "append_jsonl"),
    "the audit record": (SignedLog, "append"),
    "putting the checkpoint in place": (recorder_module, "replace_durably"),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_failed_write_at_any_step_leaves_records_that_agree(tmp_path, monkeypatch, step):
    rec = recorder(tmp_path)
    rec(RunStarted(1, False, "0" * 64))
    rec(completed(1))
    owner, name = STEPS[step]
    with monkeypatch.context() as m:
        m.setattr(owner, name, failing)
        with pytest.raises(OSError):
            rec(completed(2))

    recorder(tmp_path)  # the next process (a --resume) settles what was left
    _, _, state = load_checkpoint(tmp_path / "checkpoint.npz")
    trim_jsonl(tmp_path / "metrics.jsonl", max_round=state["round"])  # as the resumed driver does
    recorded = [r for r in read_log(tmp_path / "audit.jsonl") if r["kind"] == "round_completed"]
    metrics = [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # round 2 counts as done exactly when its audit record was written
    done = 2 if step == "putting the checkpoint in place" else 1
    assert [r["round"] for r in recorded] == list(range(1, done + 1))
    assert metrics == list(range(1, done + 1))
    assert state["round"] == done
    assert state["model_sha256"] == recorded[-1]["model_sha256"] == params_digest(completed(done).params)
    assert not (tmp_path / STAGED_NAME).exists()


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    assert trim_jsonl(path, max_round=2) == 1
    assert path.read_text() == '{"round": 1}\n{"round": 2}\n'
    path.write_text('{"round": 1}\nnot json\n{"round": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON record"):
        trim_jsonl(path, max_round=2)
