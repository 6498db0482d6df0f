"""The run's records, written from the driver's events: ``metrics.jsonl``, the audit chain, the
checkpoint, ``summary.json``, Prometheus and the console lines.

Whichever way a federation runs (over TCP or in memory) it produces the same files through this
one recorder.  Every file write is fsynced (``runlog``, ``audit``) or atomic (checkpoint,
summary), so a crash leaves the records of every checkpointed round.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..fsutil import atomic_write_bytes, replace_durably
from ..params import params_digest
from ..secagg.binding import spec_digest
from ..signedlog import SignedLog, line_of, read_log
from ..wire.crypto import Identity
from .checkpoint import STAGED_NAME, save_checkpoint, settle_staged
from .events import (
    Event,
    FederationEnded,
    RoundAborted,
    RoundCompleted,
    RoundStarted,
    RunStarted,
    SiteDropped,
    SiteJoined,
    SiteRefused,
    as_record,
)
from .metrics import CoordinatorMetrics
from .runlog import append_jsonl

__all__ = ["CHECKPOINT_NAME", "SPEC_NAME", "Recorder", "console_line", "model_path"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.npz"
SPEC_NAME = "spec.json"


def model_path(run_dir: Path, rnd: int) -> Path:
    """Where ``keep_models`` keeps the global model after round ``rnd``."""
    return Path(run_dir) / "models" / f"round-{rnd}.npz"


def console_line(record: dict[str, Any], rounds: int) -> str | None:
    """The progress line a person reads for an event (``events.as_record`` form), if any."""
    kind = record["event"]
    if kind == "RoundCompleted":
        r = record["record"]
        auc = r.get("auc")
        # the privacy the sites reported spending (policy.report_privacy), the largest of them
        spent = f"  epsilon<={max(r['epsilon'].values()):.3f}" if r.get("epsilon") else ""
        return (f"round {r['round']}/{rounds}  participants={r['participants']}  dropped={r['dropped']}  "
                f"auc={'n/a' if auc is None else f'{auc:.4f}'}  acc={r.get('accuracy', math.nan):.4f}  "
                f"{r['duration_s']:.1f}s{spent}")
    if kind == "RoundAborted":
        return f"round {record['round']} attempt {record['attempt']} aborted: {record['reason']}"
    if kind == "TestScored" and "test_auc" in record["scores"]:
        s = record["scores"]
        line = (f"test  auc={s['test_auc']:.4f}  acc={s['test_accuracy']:.4f}  "
                f"on {s['test_examples']} images from sites {s['test_sites']}")
        if not s.get("personalised"):
            return line
        # FedBN: each site's own model on its own test share first; the pooled figure mixes their scales
        own = "  ".join(f"site {k} {v:.4f}" for k, v in s.get("test_site_auc", {}).items())
        return (f"test  each site's own FedBN model on its own share: auc {own}  (mean "
                f"{s.get('test_auc_site_mean', math.nan):.4f})\n" + line.replace("test  auc=", "test  pooled over "
                "the sites' models, on their own scales: auc=", 1))
    if kind == "TestScored" and "test_auc_site_mean" in record["scores"]:
        s = record["scores"]  # the sites kept their test predictions: each sent its own AUC
        return f"test  mean site auc={s['test_auc_site_mean']:.4f}  from sites {s['test_sites']}"
    if kind == "FederationEnded":
        return record["message"] or None
    return None


class Recorder:
    """Writes a run's records into ``run_dir``. ``console``: print the progress lines."""

    def __init__(self, run_dir: Path, metrics: CoordinatorMetrics, *, run_id: str, rounds: int, identity: Identity,
                 config_sha256: str, epsilon_target: float | None = None, console: bool = True,
                 keep_models: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.epsilon_target = epsilon_target
        self.run_id = run_id
        self.config_sha256 = config_sha256
        self.keep_models = keep_models
        self.metrics = metrics
        self.rounds = rounds
        self.console = console
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.checkpoint_path = self.run_dir / CHECKPOINT_NAME
        self.staged_path = self.run_dir / STAGED_NAME
        self.audit = SignedLog(self.run_dir / "audit.jsonl", identity)
        # The newest round's signed record, as the sites are sent it (``RoundRecord``): after each
        # round, and to every site that joins (a resumed run's, read back from the log).
        self.latest_record: tuple[int, bytes] | None = None
        self.latest_abort: tuple[int, bytes] | None = None  # the newest aborted attempt's, likewise
        self.started_seq = 0  # this process's run_started record, named in each round record
        done = [r for r in read_log(self.audit.path) if r.get("kind") == "round_completed"] \
            if self.audit.path.exists() else []
        if done:
            self.latest_record = (done[-1]["round"], line_of(done[-1]))
        settle_staged(self.staged_path, self.checkpoint_path, done[-1] if done else None)

    def __call__(self, event: Event) -> None:
        if isinstance(event, RoundCompleted):
            self._completed(event)
        elif isinstance(event, RoundAborted):
            self._aborted(event)
        elif isinstance(event, FederationEnded):
            atomic_write_bytes(self.run_dir / "summary.json", (json.dumps(event.summary, indent=2) + "\n").encode())
            self._audit("federation_ended", status=event.status, rounds_completed=event.summary["rounds_completed"],
                        model_sha256=event.summary["model_sha256"], reason=event.summary.get("reason"))
        elif isinstance(event, RunStarted):
            digest = spec_digest(event.spec).hex()
            # what an auditor replays the model history from (asagiri audit verify --models); the
            # signed record pins it by its digest
            atomic_write_bytes(self.run_dir / SPEC_NAME, (json.dumps(
                {"run_id": self.run_id, "spec": event.spec, "sites": event.sites}, indent=1, sort_keys=True)
                + "\n").encode())
            started = self._audit("run_started", run_id=self.run_id, first_round=event.first_round,
                                  resumed=event.resumed, model_sha256=event.model_sha256,
                                  config_sha256=self.config_sha256, spec_digest=digest)
            self.started_seq = started["seq"]
        elif isinstance(event, SiteJoined):
            self._audit("site_joined", site=event.site, fingerprint=event.fingerprint)
        elif isinstance(event, RoundStarted):
            self.metrics.selected.set(len(event.selected))
            log.info("round %d (attempt %d): selected %s", event.round, event.attempt, event.selected)
        elif isinstance(event, SiteDropped):
            log.info("round %d.%d: site %d dropped at %s (%s)", event.round, event.attempt, event.site, event.stage,
                     event.reason)
            self.metrics.dropped.labels(event.stage or "between_rounds").inc()
            self._audit("site_dropped", round=event.round, attempt=event.attempt, site=event.site,
                        stage=event.stage, reason=event.reason)
        elif isinstance(event, SiteRefused):
            log.info("round %d.%d: site %d declined (%s)", event.round, event.attempt, event.site, event.rule)
            # A decline for the budget is the site's budget stop; any other names its policy rule.
            kind = "site_refused" if event.rule.is_policy else "budget_exhausted"
            self.metrics.refused.labels(event.rule).inc()
            self._audit(kind, round=event.round, attempt=event.attempt, site=event.site, rule=event.rule,
                        permanent=event.permanent)
        if self.console and (line := console_line(as_record(event), self.rounds)) is not None:
            print(line, flush=True)

    def _completed(self, event: RoundCompleted) -> None:
        record = event.record
        digest = params_digest(event.params)
        # The round's audit record is its commit: the checkpoint is staged before it and put in
        # place after it, so a crash or a failed write at any point leaves the checkpoint and the
        # audit log agreeing on the last completed round (``settle_staged`` finishes the job).
        t0 = time.monotonic()
        save_checkpoint(self.staged_path, params=event.params, velocity=event.velocity,
                        state={**event.state, "model_sha256": digest})
        append_jsonl(self.metrics_path, record)
        sealed = self._audit(
            "round_completed", run_id=self.run_id, log_id=self.audit.first_hash, started=self.started_seq,
            round=record["round"], attempt=record["attempt"], selected=record.get("selected"),
            participants=record["participants"], dropped=record["dropped"],
            declined=record["declined"],  # site -> the rule it named (a closed set, never free text)
            survivors=record.get("secagg_stages"), model_sha256=digest, config_sha256=self.config_sha256,
            epsilon=record.get("epsilon", {}), noise_multiplier=record.get("noise_multiplier", {}),
            metrics={k: record[k] for k in ("auc", "accuracy") if k in record},
            **({"sum_blake3": record["sum_blake3"]} if "sum_blake3" in record else {}))
        self.latest_record = (record["round"], line_of(sealed))
        replace_durably(self.staged_path, self.checkpoint_path)
        self.metrics.stage_seconds.labels("checkpoint").observe(time.monotonic() - t0)
        if self.keep_models:
            buf = io.BytesIO()
            np.savez(buf, **event.params)
            atomic_write_bytes(model_path(self.run_dir, record["round"]), buf.getvalue())
        m = self.metrics
        m.rounds_completed.inc()
        m.round_seconds.observe(record["duration_s"])
        m.participants.set(len(record["participants"]))
        if record.get("secure_aggregation"):
            m.survivors.set(len(record["participants"]))
        for stage, seconds in record.get("stage_s", {}).items():
            m.stage_seconds.labels(stage).observe(seconds)
        for key in ("auc", "accuracy"):
            if record.get(key) is not None:
                m.metric.labels(key).set(record[key])
        for site, auc in record.get("site_auc", {}).items():
            if auc is not None:  # a site whose validation share has one class has no AUC
                m.site_auc.labels(site).set(auc)
        for site, eps in record.get("epsilon", {}).items():
            m.epsilon.labels(site).set(eps)
            if self.epsilon_target is not None:
                m.epsilon_left.labels(site).set(max(0.0, self.epsilon_target - eps))

    def _aborted(self, event: RoundAborted) -> None:
        self.metrics.rounds_aborted.labels(event.cause).inc()
        log.warning("round %d attempt %d aborted (%s): %s", event.round, event.attempt, event.cause, event.reason)
        sealed = self._audit("round_aborted", run_id=self.run_id, log_id=self.audit.first_hash, started=self.started_seq,
                             round=event.round, attempt=event.attempt, selected=event.selected,
                             participants=event.participants, dropped=event.dropped, cause=event.cause,
                             reason=event.reason)
        self.latest_abort = (event.round, line_of(sealed))

    def _audit(self, kind: str, **fields: Any) -> dict[str, Any]:
        return self.audit.append(kind, **fields, time=round(time.time(), 3))
