"""A site's receipts: the coordinator's signed record of each round, held against what this site
saw, and kept in the site's own signed log (protocol/SPEC.md §9).

After each round the coordinator sends its audit record of it (``RoundRecord``): one line of its
``audit.jsonl``, signed with its identity key, whose hash fixes every record before it.  The site
checks the signature against the coordinator key it pinned, then what it can check from its own
side of the round:

- the model digest is the digest of the global model it was sent to evaluate;
- the ε and σ credited to it are what it reported (or absent, if it reported none);
- the participant list is the survivor list it signed (secure aggregation), holds it only if it
  sent an update in that attempt, and names its refusal if it declined;
- no record contradicts one it already holds (two records with the same ``seq``).

A record that passes goes into ``receipts.jsonl`` whole, so any one site's receipts pin the
coordinator's log: ``asagiri audit verify --receipts`` finds a rewrite, a cut, or a fork.  A record
that fails goes in as a ``round_dispute`` with the coordinator's signed record as evidence, and
the site takes no further part in the run (rule ``record``).  So does a record that never comes:
the site trains no later round until the coordinator sends it (or a newer one).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ..policy import SitePolicy
from ..signedlog import SignedLog, read_log, verify_record
from ..wire.crypto import PublicIdentity
from ..wire.messages import RoundRecord

__all__ = ["RoundWitness"]

log = logging.getLogger(__name__)

PRIVACY_KEYS = ("epsilon", "noise_multiplier")


@dataclass
class _Attempt:
    """What this site did in one round attempt."""

    sent: bool = False  # an update (FitRes, or MaskedInput under secure aggregation)
    declined: bool = False
    survivors: list[int] | None = None  # the survivor list it signed


@dataclass
class _Evaluated:
    """The global model of a completed round, as this site evaluated it, awaiting its record."""

    round: int
    model_sha256: str
    privacy: dict[str, float]


@dataclass
class _Run:
    attempts: dict[tuple[int, int], _Attempt] = field(default_factory=dict)
    pending: _Evaluated | None = None
    kept: dict[int, str] = field(default_factory=dict)  # seq -> hash of every record this site holds
    dispute: str | None = None


class RoundWitness:
    """The site's side of the round records, for one site across its sessions and runs."""

    def __init__(self, receipts: SignedLog, coordinator: PublicIdentity, site_id: int, policy: SitePolicy) -> None:
        self.receipts = receipts
        self.coordinator = coordinator
        self.site_id = site_id
        self.policy = policy
        self._runs: dict[str, _Run] = {}
        if receipts.path.exists():  # SignedLog verified it on open
            for r in read_log(receipts.path):
                record = r.get("record")
                if r.get("kind") == "round_receipt" and isinstance(record, dict):
                    self._run(r.get("run_id", "")).kept[record["seq"]] = record["hash"]

    def _run(self, run_id: str) -> _Run:
        return self._runs.setdefault(run_id, _Run())

    def _attempt(self, run_id: str, rnd: int, attempt: int) -> _Attempt:
        return self._run(run_id).attempts.setdefault((rnd, attempt), _Attempt())

    # -- what this site did ------------------------------------------------------------------------

    def asked(self, run_id: str, rnd: int, attempt: int) -> None:
        self._attempt(run_id, rnd, attempt)

    def sent_update(self, run_id: str, rnd: int, attempt: int) -> None:
        self._attempt(run_id, rnd, attempt).sent = True

    def declined(self, run_id: str, rnd: int, attempt: int) -> None:
        self._attempt(run_id, rnd, attempt).declined = True

    def signed_survivors(self, run_id: str, rnd: int, attempt: int, survivors: list[int]) -> None:
        self._attempt(run_id, rnd, attempt).survivors = sorted(survivors)

    def evaluated(self, run_id: str, rnd: int, model_sha256: str, metrics: dict[str, float]) -> None:
        privacy = {k: metrics[k] for k in PRIVACY_KEYS if k in metrics}
        self._run(run_id).pending = _Evaluated(rnd, model_sha256, privacy)

    # -- the coordinator's side --------------------------------------------------------------------

    def disputed(self, run_id: str) -> bool:
        return self._run(run_id).dispute is not None

    def before_fit(self, run_id: str, rnd: int) -> None:
        """Refuse (rule ``record``) to train round ``rnd`` of a run whose coordinator signed a false
        record, or that moved on without sending the record of the last round this site evaluated."""
        run = self._run(run_id)
        if run.dispute is not None:
            self.policy.refuse("record", f"the coordinator signed a false record earlier in this run: {run.dispute}")
        pending = run.pending
        if pending is None:
            return
        if rnd == pending.round:  # the round is run again (a coordinator that restarted): its record is moot
            run.pending = None
        elif rnd > pending.round:
            self.policy.refuse("record", f"round {rnd} started, but the coordinator never sent its signed record of "
                                         f"round {pending.round}, whose model this site evaluated")

    def pending_round(self, run_id: str) -> int | None:
        pending = self._run(run_id).pending
        return pending.round if pending is not None else None

    def record(self, run_id: str, msg: RoundRecord) -> None:
        """Check the coordinator's record of round ``msg.round`` and keep it; a record that fails is
        kept as evidence and raises :class:`Refusal` (the site leaves the run)."""
        run = self._run(run_id)
        rec, problem = verify_record(msg.record, self.coordinator)
        if rec is None:
            self._dispute(run_id, msg.round, None, f"the record does not verify under the pinned coordinator key: "
                                                   f"{problem}")
        problem = self._contradiction(run_id, run, msg.round, rec)
        if problem is not None:
            self._dispute(run_id, msg.round, rec, problem)
        if run.kept.get(rec["seq"]) == rec["hash"]:
            return  # already held (sent again after a reconnect)
        pending = run.pending
        evaluated = pending is not None and pending.round == msg.round
        if pending is not None and msg.round >= pending.round:
            run.pending = None
        run.kept[rec["seq"]] = rec["hash"]
        for key in [k for k in run.attempts if k[0] <= msg.round]:
            del run.attempts[key]
        try:
            self.receipts.append("round_receipt", run_id=run_id, round=msg.round, site=self.site_id,
                                 evaluated=evaluated, record=rec, time=round(time.time(), 3))
        except OSError as exc:  # this site's loss of evidence, not a reason to leave the federation
            log.error("round %d: could not write the receipt (%s)", msg.round, exc)
            return
        log.info("round %d: kept the coordinator's signed record (log record %d)", msg.round, rec["seq"])

    def _contradiction(self, run_id: str, run: _Run, rnd: int, rec: dict[str, Any]) -> str | None:
        """What in the record contradicts this site's own view, or None."""
        if rec["kind"] != "round_completed" or rec.get("run_id") != run_id or type(rec.get("round")) is not int \
                or rec["round"] != rnd:
            return (f"a {rec['kind']!r} record of run {rec.get('run_id')!r} round {rec.get('round')!r} sent as the "
                    f"record of run {run_id!r} round {rnd}")
        held = run.kept.get(rec["seq"])
        if held is not None and held != rec["hash"]:
            return f"a second, different record {rec['seq']} of the coordinator's log (a fork)"
        fields = {k: rec.get(k) for k in ("attempt", "selected", "participants", "dropped", "declined")}
        if not (type(fields["attempt"]) is int and all(_ids(fields[k]) for k in ("selected", "participants", "dropped"))
                and isinstance(fields["declined"], dict)
                and all(isinstance(rec.get(k, {}), dict) for k in PRIVACY_KEYS)):
            return "the record's attempt, site lists or privacy maps are malformed"
        pending = run.pending
        if pending is not None and pending.round == rnd:
            if rec.get("model_sha256") != pending.model_sha256:
                return (f"it records model {str(rec.get('model_sha256'))[:16]}..., but this site was sent "
                        f"{pending.model_sha256[:16]}... to evaluate")
            for key in PRIVACY_KEYS:
                claimed = rec.get(key, {}).get(str(self.site_id))
                if claimed != pending.privacy.get(key):
                    return f"it credits this site with {key} {claimed!r}; the site reported {pending.privacy.get(key)!r}"
        return _participation(self.site_id, run.attempts.get((rnd, fields["attempt"])), fields)

    def _dispute(self, run_id: str, rnd: int, rec: dict[str, Any] | None, problem: str) -> NoReturn:
        self._run(run_id).dispute = f"round {rnd}: {problem}"
        log.error("round %d: the coordinator's record contradicts this site: %s; leaving the run", rnd, problem)
        try:
            self.receipts.append("round_dispute", run_id=run_id, round=rnd, site=self.site_id, problem=problem,
                                 record=rec, time=round(time.time(), 3))
        except OSError as exc:
            log.error("round %d: could not write the dispute (%s)", rnd, exc)
        self.policy.refuse("record", problem)


def _ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _participation(me: int, seen: _Attempt | None, fields: dict[str, Any]) -> str | None:
    """Whether the record's lists agree with what this site did in that attempt (nothing to say if
    it holds no memory of the attempt: it restarted, or was not asked)."""
    if seen is None:
        return None
    listed = me in fields["participants"]
    if seen.survivors is not None and fields["participants"] != seen.survivors:
        return f"participants {fields['participants']}, but this site signed survivors {seen.survivors}"
    if seen.declined and str(me) not in fields["declined"]:
        return "this site declined that attempt; the record does not say so"
    if listed and not seen.sent:
        return "it lists this site as a participant, but the site sent no update in that attempt"
    if seen.sent and not listed and me not in fields["dropped"] and str(me) not in fields["declined"]:
        return "this site sent an update, but the record lists it neither as a participant, nor dropped, nor declined"
    return None
