"""A run's model history, replayed from ``W_0`` through its verified sums (SPEC §6.9): what a
site that joins late checks, and what ``asagiri audit verify --models`` reports.

From the run directory it reads ``spec.json`` (the spec the sites signed, pinned by the
``spec_digest`` of the signed ``run_started`` record, and the sites' identity keys) and
``sums/`` (each recorded round's ``SumRecord``).  It derives ``W_0`` itself, checks each sum
against every survivor's vouch under the sites' keys for a round on the model it holds, takes
the server step, and compares each model's digest with the one the signed log records for that
round.  Nothing in the directory is trusted but what those checks prove.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunSpec
from ..data.loaders import dataset_info
from ..initial import derived_initial, initial_key
from ..observe.recorder import SPEC_NAME
from ..observe.sums import SumHistory
from ..params import params_digest
from ..secagg import binding
from ..secagg.history import RecordRefused, check_record
from ..wire.crypto import PublicIdentity
from .trajectory import next_model

__all__ = ["ModelReplay", "replay_models"]


@dataclass
class ModelReplay:
    rounds: list[int] = field(default_factory=list)  # rounds whose model the replay proved
    problems: list[str] = field(default_factory=list)
    final_sha256: str | None = None  # the last proven model's digest
    keys: dict[int, str] = field(default_factory=dict)  # the site keys the vouches verified under (fingerprints)


def replay_models(run_dir: Path, records: Sequence[Mapping[str, Any]],
                  site_keys: Mapping[int, PublicIdentity] | None = None) -> ModelReplay:
    """Replay ``run_dir``'s model history against its audit ``records`` (whose chain verified).
    ``site_keys``: the sites' keys as the auditor has them out of band (default: spec.json's)."""
    out = ModelReplay()
    started = [r for r in records if r.get("kind") == "run_started"]
    try:
        saved = json.loads((run_dir / SPEC_NAME).read_text())
        run_id, wire, sites = saved["run_id"], saved["spec"], saved["sites"]
        spec = RunSpec.model_validate(wire)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        out.problems.append(f"{run_dir / SPEC_NAME}: cannot be read ({exc})")
        return out
    digest = binding.spec_digest(wire)
    if not started or started[0].get("spec_digest") != digest.hex() or started[0].get("run_id") != run_id:
        out.problems.append(f"{SPEC_NAME} is not the spec the log's first run_started record names")
        return out
    if not spec.secagg.enabled:
        out.problems.append("the run aggregated in the clear: it has no verified sums to replay")
        return out
    try:
        keys = dict(site_keys) if site_keys is not None else {int(i): PublicIdentity.from_hex(h) for i, h in sites.items()}
        channels, classes = dataset_info(spec.data.dataset, None)
    except (ValueError, TypeError) as exc:
        out.problems.append(f"{SPEC_NAME}: {exc}")
        return out
    out.keys = {i: k.fingerprint() for i, k in sorted(keys.items())}
    model = derived_initial(spec.model, dp=spec.dp.enabled, fedbn=spec.strategy.fedbn, channels=channels,
                            classes=classes, key=initial_key(run_id, wire))
    if params_digest(model) != started[0].get("model_sha256"):
        out.problems.append("W_0 derived from the run is not the model the log says round 1 started from")
        return out
    recorded = {r["round"]: r for r in records if r.get("kind") == "round_completed"}  # a redone round: the last
    velocity = None
    length = binding.vector_len(model)
    history = SumHistory(run_dir / "sums", vector_len=length)
    for rec in history.after(0):
        try:
            proven = check_record(rec, run_id=run_id, secagg=spec.secagg, spec_digest=digest, vector_len=length,
                                  trained_on=binding.params_digest(model), peers=keys)
        except RecordRefused as exc:
            out.problems.append(f"round {rec.round}: its sum is not proven for the model before it: {exc}")
            return out
        model, velocity = next_model(model, velocity, proven.total, proven.plan, spec.strategy, len(proven.survivors))
        logged = recorded.get(rec.round)
        if logged is None or logged.get("model_sha256") != params_digest(model) or \
                logged.get("sum_blake3") != proven.digest.hex():
            out.problems.append(f"round {rec.round}: the log does not record the model and sum its proven sum gives")
            return out
        out.rounds.append(rec.round)
        out.final_sha256 = params_digest(model)
    missing = sorted(set(recorded) - set(out.rounds))
    if missing:
        out.problems.append(f"rounds {missing} are in the log but their sums are not in {run_dir / 'sums'}")
    return out
