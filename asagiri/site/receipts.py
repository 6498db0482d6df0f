"""A site's receipts: the coordinator's signed record of each round, held against what this site
saw, and kept in the site's own signed log (protocol/SPEC.md §9).

After each round the coordinator sends its audit record of it (``RoundRecord``): one line of its
``audit.jsonl``, signed with its identity key, whose hash fixes every record before it.  It sends
the newest one again on each join.  The site checks the signature against the coordinator key it
pinned, then what it can check from its own side of the round:

- the model digest is the digest of the global model it was sent to evaluate;
- the ε and σ credited to it are what it reported (a missing entry is an answer that came late);
- the participant list is the survivor list it signed (secure aggregation), holds it only if it
  sent an update in that attempt, names its refusal if it declined, and the record is of the
  attempt it took part in unless that attempt was aborted;
- no record contradicts one it already holds (two records with the same ``seq`` of one log).

A record that passes goes into ``receipts.jsonl`` whole, so any one site's receipts pin the
coordinator's log: ``asagiri audit verify --receipts`` finds a rewrite, a cut, or a fork.  A record
that fails goes in as a ``round_dispute`` with the coordinator's signed record attached, and the
site takes no further part in the run (rule ``record``), restarted or not.  A record that never
comes stops the site too: it trains no later round until the coordinator sends it.  Only a new
session can excuse it (the coordinator restarted, or the site was away): its join record then
shows where the coordinator's log ends, and the site keeps its own signed word of what it
evaluated, and of each attempt it contributed to (``round_unrecorded``), for the verifier.  It
excuses at most ``policy.max_unrecorded`` of them in a run: a coordinator that reconnects instead
of sending records would otherwise take sums that no log holds.  The attempts a site contributed
to are in its receipts as they happen (``round_contributed``, ``round_aborted``), so a restart of
the site excuses nothing either.

What one session remembers of the rounds it took part in is forgotten past the join record of
the next: a coordinator that restarted redoes those rounds, legitimately without this site.
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
    unmasked: bool = False  # it answered the attempt's UnmaskRequest: the sum may be the coordinator's
    declined: bool = False
    survivors: list[int] | None = None  # the survivor list it signed
    verified: str | None = None  # the digest of the sum it verified, hex

    @property
    def took_part(self) -> bool:
        return self.sent or self.survivors is not None


@dataclass
class _Evaluated:
    """The global model of a completed round, as this site evaluated it, awaiting its record."""

    round: int
    model_sha256: str
    privacy: dict[str, float]
    started: int | None  # the coordinator process it came from (``started`` of its records), if known


@dataclass
class _Run:
    attempts: dict[tuple[int, int], _Attempt] = field(default_factory=dict)
    unrecorded: int = 0  # contributed rounds (or evaluated models) whose record a new session excused
    aborted: set[tuple[int, int]] = field(default_factory=set)
    owed_aborts: set[tuple[int, int]] = field(default_factory=set)  # aborted after unmasking, no signed record yet
    pending: _Evaluated | None = None
    kept: dict[tuple[str, int], str] = field(default_factory=dict)  # (log id, seq) -> hash of each record held
    dispute: str | None = None
    joined: bool = False  # a session began and its join record has not come
    started: int | None = None  # ``started`` of the newest record of this session: the coordinator process


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
                self._reload(r)

    def _reload(self, r: dict[str, Any]) -> None:
        """One line of this site's own receipts, read back after a restart: what it holds, what it
        disputed, and the attempts it contributed to whose record or abort has not come (they
        stay owed, as if the site had never stopped)."""
        run, record, kind = self._run(str(r.get("run_id"))), r.get("record"), r.get("kind")
        key = (r.get("round"), r.get("attempt"))
        if kind == "round_receipt" and isinstance(record, dict):
            run.kept[(str(record.get("log_id")), record["seq"])] = record["hash"]
            run.attempts = {k: v for k, v in run.attempts.items() if k[0] > record["round"]}
        elif kind == "round_dispute":
            run.dispute = f"round {r.get('round')}: {r.get('problem')}"
        elif kind == "round_contributed" and type(key[0]) is int and type(key[1]) is int:
            run.attempts[key] = _Attempt(sent=True)
        elif kind == "round_unmasked" and key in run.attempts:
            run.attempts[key].unmasked = True
        elif kind == "round_verified" and key in run.attempts:
            run.attempts[key].verified = r.get("sum_blake3")
        elif kind == "round_aborted":
            run.attempts.pop(key, None)
            if r.get("after_unmask") is True:
                run.unrecorded += 1
                run.owed_aborts.add(key)  # type: ignore[arg-type]
        elif kind == "round_abort_receipt" and key in run.owed_aborts:
            run.unrecorded -= 1
            run.owed_aborts.discard(key)  # type: ignore[arg-type]
        elif kind == "round_unrecorded":
            run.unrecorded += 0 if r.get("log_passed") is True else 1
            if r.get("attempt") is not None:
                run.attempts.pop(key, None)

    def _run(self, run_id: str) -> _Run:
        return self._runs.setdefault(run_id, _Run())

    def _attempt(self, run_id: str, rnd: int, attempt: int) -> _Attempt:
        return self._run(run_id).attempts.setdefault((rnd, attempt), _Attempt())

    # -- what this site did ------------------------------------------------------------------------

    def joined(self, run_id: str) -> None:
        """A new session of ``run_id`` began (its Welcome accepted).  Attempts of other runs still
        owed a record are written down as unrecorded now: a coordinator that moves the site to
        another run id leaves them visible in that run's receipts."""
        for other_id, other in self._runs.items():
            if other_id != run_id:
                for (r, a), seen in sorted(other.attempts.items()):
                    if seen.took_part and (r, a) not in other.aborted:
                        self._excuse(other_id, (r, a), None, passed=False, left_for=run_id)
                other.attempts = {k: v for k, v in other.attempts.items() if not v.took_part}
        run = self._run(run_id)
        run.joined, run.started = True, None

    def settle(self, run_id: str) -> None:
        """A message other than a record arrived: if it is the session's first, no join record came,
        so the coordinator's log holds no completed round (or it withholds the record, and the
        site's own word of what it evaluated is all the verifier gets)."""
        run = self._run(run_id)
        if run.joined:
            run.joined = False
            self._rejoined(run_id, run, None)

    def asked(self, run_id: str, rnd: int, attempt: int) -> None:
        self._attempt(run_id, rnd, attempt)

    def sent_update(self, run_id: str, rnd: int, attempt: int) -> None:
        self._contributed(run_id, rnd, attempt)
        self._attempt(run_id, rnd, attempt).sent = True

    def _contributed(self, run_id: str, rnd: int, attempt: int) -> None:
        """The first time this site contributes to an attempt, its own signed word of it: a restart
        of the site does not excuse the coordinator from that attempt's record."""
        if not self._attempt(run_id, rnd, attempt).took_part:
            self._write("round_contributed", run_id, rnd, attempt=attempt)

    def declined(self, run_id: str, rnd: int, attempt: int) -> None:
        self._attempt(run_id, rnd, attempt).declined = True

    def unmasked(self, run_id: str, rnd: int, attempt: int) -> None:
        seen = self._attempt(run_id, rnd, attempt)
        if not seen.unmasked:
            seen.unmasked = True
            self._write("round_unmasked", run_id, rnd, attempt=attempt)

    def verified(self, run_id: str, rnd: int, attempt: int, sum_digest: bytes) -> None:
        """The attempt's sum checked out against every survivor's vouch: the record must name it."""
        seen = self._attempt(run_id, rnd, attempt)
        seen.verified = sum_digest.hex()
        self._write("round_verified", run_id, rnd, attempt=attempt, sum_blake3=seen.verified)

    def aborted(self, run_id: str, rnd: int, attempt: int) -> None:
        """The coordinator says the attempt was aborted.  After this site answered its UnmaskRequest
        the coordinator may hold the sum all the same, so such an abort is excused like a missing
        record: it counts against ``max_unrecorded``."""
        run = self._run(run_id)
        seen = run.attempts.get((rnd, attempt))
        if seen is not None and seen.took_part and (rnd, attempt) not in run.aborted:
            self._write("round_aborted", run_id, rnd, attempt=attempt, after_unmask=seen.unmasked)
            if seen.unmasked:
                log.warning("round %d.%d: aborted after this site revealed its shares; counted as unrecorded "
                            "until the coordinator's signed record of the abort comes", rnd, attempt)
                run.unrecorded += 1
                run.owed_aborts.add((rnd, attempt))
        run.aborted.add((rnd, attempt))

    def signed_survivors(self, run_id: str, rnd: int, attempt: int, survivors: list[int]) -> None:
        self._contributed(run_id, rnd, attempt)
        self._attempt(run_id, rnd, attempt).survivors = sorted(survivors)

    def evaluated(self, run_id: str, rnd: int, model_sha256: str, metrics: dict[str, float]) -> None:
        run = self._run(run_id)
        privacy = {k: metrics[k] for k in PRIVACY_KEYS if k in metrics}
        run.pending = _Evaluated(rnd, model_sha256, privacy, run.started)

    # -- the coordinator's side --------------------------------------------------------------------

    def disputed(self, run_id: str) -> bool:
        return self._run(run_id).dispute is not None

    def pending_round(self, run_id: str) -> int | None:
        pending = self._run(run_id).pending
        return pending.round if pending is not None else None

    def before_fit(self, run_id: str, rnd: int, attempt: int) -> None:
        """Refuse (rule ``record``) to train round ``rnd`` (attempt ``attempt``) of a run whose
        coordinator signed a false record, or that moved on without sending the record of a round
        this site contributed to: the last one whose model it evaluated, and any attempt in which
        it sent an update or signed survivors, until that attempt's record or its abort came."""
        run = self._run(run_id)
        if run.dispute is not None:
            self.policy.refuse("record", f"the coordinator was caught lying earlier in this run: {run.dispute}")
        cap = self.policy.cfg.max_unrecorded
        if run.unrecorded > cap:
            self.policy.refuse("record", f"{run.unrecorded} rounds of this run went unrecorded across new sessions "
                                         f"(this site accepts {cap}): a coordinator that reconnects instead of "
                                         "sending its record would take sums no log holds")
        if run.pending is not None and rnd >= run.pending.round:
            self.policy.refuse("record", f"round {rnd} was asked for before the coordinator's signed record of round "
                                         f"{run.pending.round}, whose model this site evaluated")
        for (r, a), seen in run.attempts.items():
            if seen.took_part and (r, a) < (rnd, attempt) and (r, a) not in run.aborted:
                self.policy.refuse("record", f"round {rnd}.{attempt} was asked for before the coordinator's signed "
                                             f"record (or abort) of round {r}.{a}, to which this site contributed")

    def record(self, run_id: str, msg: RoundRecord) -> dict[str, Any] | None:
        """Check the coordinator's record of round ``msg.round`` and keep it; a record that fails is
        kept as evidence and raises :class:`~asagiri.policy.Refusal` (the site leaves the run).
        Returns the record as signed (None: this site left the run, nothing was read)."""
        run = self._run(run_id)
        if run.dispute is not None:
            return None  # this site has left the run; nothing more of it is written
        rec, problem = verify_record(msg.record, self.coordinator)
        if rec is None:
            self._dispute(run_id, msg.round, None, f"the record does not verify under the pinned coordinator key: "
                                                   f"{problem}")
        if rec["kind"] == "round_aborted":
            self._abort_recorded(run_id, run, msg.round, rec)
            return rec
        problem = _malformed(run_id, msg.round, rec)
        if problem is not None:
            self._dispute(run_id, msg.round, rec, problem)
        where = (rec["log_id"], rec["seq"])
        if run.kept.get(where, rec["hash"]) != rec["hash"]:
            self._dispute(run_id, msg.round, rec, f"a second, different record {rec['seq']} of the coordinator's log "
                                                  "(a fork)")
        if run.joined:  # the first record of a session: the coordinator's log ends there
            run.joined = False
            self._rejoined(run_id, run, rec)
        run.started = rec["started"]
        if where in run.kept:
            return rec  # held already (sent again on joining)
        pending = run.pending
        if pending is not None and msg.round > pending.round:
            self._dispute(run_id, msg.round, rec, f"a record of round {msg.round}, but none of round {pending.round}, "
                                                  "whose model this site evaluated")
        if pending is not None and pending.round != msg.round:
            pending = None
        if pending is None and not any(r == msg.round for r, _ in run.attempts):
            return rec  # a round this site had no part in: nothing to check, nothing kept
        problem = self._contradiction(run, rec, pending)
        if problem is not None:
            self._dispute(run_id, msg.round, rec, problem)
        evaluated = pending is not None
        if evaluated:
            run.pending = None
        run.kept[where] = rec["hash"]
        for key in [k for k in run.attempts if k[0] <= msg.round]:
            del run.attempts[key]
        self._write("round_receipt", run_id, msg.round, evaluated=evaluated, record=rec)
        log.info("round %d: kept the coordinator's signed record (log record %d)", msg.round, rec["seq"])
        return rec

    # -- checks ------------------------------------------------------------------------------------

    def _contradiction(self, run: _Run, rec: dict[str, Any], pending: _Evaluated | None) -> str | None:
        """What in the record contradicts this site's own view, or None."""
        if pending is not None:
            if rec["model_sha256"] != pending.model_sha256:
                return (f"it records model {rec['model_sha256'][:16]}..., but this site was sent "
                        f"{pending.model_sha256[:16]}... to evaluate")
            for key in PRIVACY_KEYS:
                claimed = rec[key].get(str(self.site_id))
                # absent: the answer came after the deadline; a value must be the one reported
                if claimed is not None and claimed != pending.privacy.get(key):
                    return (f"it credits this site with {key} {claimed!r}; the site reported "
                            f"{pending.privacy.get(key)!r}")
        rnd, attempt = rec["round"], rec["attempt"]
        for (r, a), seen in run.attempts.items():
            if r == rnd and a != attempt and seen.took_part and (r, a) not in run.aborted:
                return f"it records attempt {attempt}, but attempt {a}, in which this site took part, was never aborted"
        return _participation(self.site_id, run.attempts.get((rnd, attempt)), rec)

    def _rejoined(self, run_id: str, run: _Run, rec: dict[str, Any] | None) -> None:
        """A new session, whose first record ``rec`` (None: the coordinator's log holds no round)
        shows where the coordinator's log ends.  What this site remembers of that round and later
        ones may be of rounds redone after the coordinator restarted, or completed while the site
        was away: it is forgotten.  The model it evaluated is checked only against a record of
        the same coordinator process; otherwise the site keeps its own signed word of it."""
        rnd = 0 if rec is None else rec["round"]
        pending = run.pending
        same_process = rec is not None and pending is not None and pending.started == rec["started"]
        if pending is not None and not (pending.round == rnd and same_process):
            log.warning("round %d: no record of the model this site evaluated came from that coordinator process "
                        "(it restarted, or this site was away); keeping the site's own word of it", pending.round)
            self._write("round_unrecorded", run_id, pending.round, model_sha256=pending.model_sha256,
                        privacy=pending.privacy, log_id=None if rec is None else rec["log_id"],
                        seen_seq=None if rec is None else rec["seq"])
            run.pending = None
            run.unrecorded += 1
        for (r, a), seen in sorted(run.attempts.items()):
            if not seen.took_part or (r, a) in run.aborted:
                continue
            if rec is not None and (r, a) == (rnd, rec["attempt"]):
                continue  # this very record is of it: checked as any record is (a resumed
                # coordinator redoes a round under a new attempt, never the same one)
            # The log ends before r: no coordinator process recorded the attempt, and none will
            # (a restart, or a coordinator that reconnects instead of recording): excused, counted.
            # The log passed r: it should hold the attempt's record or abort, which this site was
            # not there to receive; the verifier checks that the log does.
            self._excuse(run_id, (r, a), rec, passed=r <= rnd and rec is not None)
            del run.attempts[(r, a)]
        run.attempts = {k: v for k, v in run.attempts.items()
                        if k[0] < rnd or (rec is not None and k == (rnd, rec["attempt"]))}
        run.aborted = {k for k in run.aborted if k[0] < rnd}

    def _excuse(self, run_id: str, key: tuple[int, int], rec: dict[str, Any] | None, *, passed: bool,
                **why: Any) -> None:
        """An attempt this site contributed to, owed a record that will not come: its own signed
        word of it (``round_unrecorded``), with the record that showed the log's end kept whole (a
        record made up to look as if the log passed the round is then evidence), counted against
        ``max_unrecorded`` unless the log passed it (the verifier checks those)."""
        r, a = key
        log.warning("run %s round %d.%d: this site contributed to it and no record or abort of it came; keeping "
                    "the site's own word of it", run_id, r, a)
        self._write("round_unrecorded", run_id, r, attempt=a, contributed=True, log_passed=passed,
                    log_id=None if rec is None else rec["log_id"], seen_seq=None if rec is None else rec["seq"],
                    seen_record=rec, **why)
        self._run(run_id).unrecorded += 0 if passed else 1

    def _abort_recorded(self, run_id: str, run: _Run, rnd: int, rec: dict[str, Any]) -> None:
        """The coordinator's signed record of an aborted attempt: an abort after this site revealed
        its shares is then in the coordinator's log, and no longer counts against ``max_unrecorded``."""
        attempt = rec.get("attempt")
        if rec.get("run_id") != run_id or rec.get("round") != rnd or type(attempt) is not int:
            self._dispute(run_id, rnd, rec, f"a round_aborted record of run {rec.get('run_id')!r} round "
                                            f"{rec.get('round')!r} sent as an abort of run {run_id!r} round {rnd}")
        key = (rnd, attempt)
        if key in run.owed_aborts:
            run.owed_aborts.discard(key)
            run.unrecorded -= 1
            self._write("round_abort_receipt", run_id, rnd, attempt=attempt, record=rec)

    def false_sum(self, run_id: str, rnd: int, problem: str) -> None:
        """The coordinator relayed vouches that its announced sum fails (SPEC §6.8): kept as a
        dispute, so this site declines every later round of the run."""
        run = self._run(run_id)
        if run.dispute is None:
            run.dispute = f"round {rnd}: {problem}"
            log.error("round %d: the coordinator announced a sum its survivors' vouches refute: %s; leaving the run",
                      rnd, problem)
            self._write("round_dispute", run_id, rnd, problem=problem, record=None)

    def _dispute(self, run_id: str, rnd: int, rec: dict[str, Any] | None, problem: str) -> NoReturn:
        self._run(run_id).dispute = f"round {rnd}: {problem}"
        log.error("round %d: the coordinator's record contradicts this site: %s; leaving the run", rnd, problem)
        self._write("round_dispute", run_id, rnd, problem=problem, record=rec)
        self.policy.refuse("record", problem)

    def _write(self, kind: str, run_id: str, rnd: int, **fields: Any) -> None:
        """A failed write is this site's loss of evidence, not a reason to leave the federation."""
        try:
            self.receipts.append(kind, run_id=run_id, round=rnd, site=self.site_id, **fields,
                                 time=round(time.time(), 3))
        except (OSError, ValueError, RecursionError) as exc:
            log.error("round %d: could not write the %s (%s)", rnd, kind, exc)


def _ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _malformed(run_id: str, rnd: int, rec: dict[str, Any]) -> str | None:
    """Why a verified record is not a well-formed record of round ``rnd`` of this run, or None."""
    if rec["kind"] != "round_completed" or rec.get("run_id") != run_id or type(rec.get("round")) is not int \
            or rec["round"] != rnd:
        return (f"a {rec['kind']!r} record of run {rec.get('run_id')!r} round {rec.get('round')!r} sent as the "
                f"record of run {run_id!r} round {rnd}")
    if not (type(rec.get("attempt")) is int and all(_ids(rec.get(k)) for k in ("selected", "participants", "dropped"))
            and all(isinstance(rec.get(k), dict) for k in ("declined", *PRIVACY_KEYS))
            and isinstance(rec.get("model_sha256"), str) and isinstance(rec.get("log_id"), str)
            and type(rec.get("started")) is int):
        return "the record's attempt, site lists, privacy maps, model digest, log id or start are malformed"
    return None


def _participation(me: int, seen: _Attempt | None, rec: dict[str, Any]) -> str | None:
    """Whether the record's lists agree with what this site did in that attempt (nothing to say if
    it holds no memory of the attempt: it restarted, or was not asked)."""
    if seen is None:
        return None
    participants, listed = rec["participants"], me in rec["participants"]
    if seen.survivors is not None and participants != seen.survivors:
        return f"participants {participants}, but this site signed survivors {seen.survivors}"
    if seen.declined and str(me) not in rec["declined"]:
        return "this site declined that attempt; the record does not say so"
    if listed and not seen.sent:
        return "it lists this site as a participant, but the site sent no update in that attempt"
    # a vouch with no proof after it is not held against the record: the site may have lost the
    # proof with its connection; it adopts no sum it did not verify either way
    if seen.verified is not None and rec.get("sum_blake3") != seen.verified:
        return (f"it records sum {str(rec.get('sum_blake3'))[:16]}..., but this site verified "
                f"{seen.verified[:16]}...")
    if seen.sent and not listed and me not in rec["dropped"] and str(me) not in rec["declined"]:
        return "this site sent an update, but the record lists it neither as a participant, nor dropped, nor declined"
    return None
