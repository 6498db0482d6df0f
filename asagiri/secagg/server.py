"""The coordinator's side of secure aggregation: a sans-IO state machine.

Stages ADVERTISE (U1) -> SHARE (U2) -> MASKED_INPUT (U3) -> CONSISTENCY (U4) -> UNMASK -> VERIFY ->
DONE, each closed when every expected site answered, was lost, or the stage timed out; too few, and
the round is ABORTED with nothing unmasked.  VERIFY (SPEC §6.8, ``verify.py``): the unmasked sum
goes to every survivor, each vouches for it, and the vouches go back to all of them; a survivor
that does not vouch, or vouches that do not add up to the sum, leave the round without a sum.  The transitions are ``SERVER_TRANSITIONS`` in ``_states.py``
(drawn in protocol/SPEC.md §6.6).

Masked inputs are added into one running ring sum as they arrive (memory O(d), not O(n d)).
Unmasking removes each survivor's self mask (b_u rebuilt from t shares) and, for each site that
shared keys but sent no input, the pairwise masks it left behind in its surviving neighbours'
inputs (its masking key rebuilt from t shares and checked against its advertised public key).
The machine sees only the sum; it never asks a site for two kinds of share of one peer, and the
sites enforce that anyway (``client.py``).

With participation batches, each stage keeps whole batches only: a batch with a member that did
not advertise, share or send its masked input is left out of the round whole (its members are
then dropped sites, as any other).  A site also gets its batch-mates' keys and masks with them;
those masks are never removed, since no batch-mate of a survivor is ever dropped.  Masked inputs
are held per batch until the batch is complete, then added into the running sum, so an
incomplete batch's inputs never touch it (memory: one vector per batch still incomplete).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..causes import AbortCause
from ..errors import ProtocolViolation
from ..wire.crypto import AuthenticationFailed, EphemeralKey, PublicIdentity
from ..wire.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySig,
    KeyRoster,
    MaskedInput,
    Message,
    SecAggStart,
    ShareDelivery,
    ShareKeys,
    SumAnnounce,
    SumProof,
    SumVouch,
    UnmaskRequest,
    UnmaskResponse,
)
from . import shamir, verify
from ._states import SERVER_TRANSITIONS, ServerStage, StageClosed, StageFailed
from .binding import RoundParams, keys_message, survivors_message
from .graph import graph_seed, mask_peers, neighbours
from .masking import add_masks, pair_seed, sign
from .prg import PRGS, Prg
from .rules import Batches, complete_batches

__all__ = ["ProtocolViolation", "ServerStage", "ServerStateMachine"]


@dataclass(frozen=True, slots=True)
class Outbound:
    site: int
    msg: Message


@dataclass
class _Keys:
    c_pk: bytes
    s_pk: bytes
    signature: bytes


@dataclass
class SecAggResult:
    total: np.ndarray
    survivors: list[int]
    dropped: list[int]
    stage_sites: dict[str, list[int]] = field(default_factory=dict)
    sum_digest: bytes = b""  # verify.sum_digest(total), the challenge's and the records' name for it
    vouches: list[list] = field(default_factory=list)  # [site, masked scalars, signature], ids ascending


class ServerStateMachine:
    def __init__(self, *, params: RoundParams, min_clients: int, identities: dict[int, PublicIdentity],
                 batches: Batches | None = None) -> None:
        if params.prg not in PRGS:
            raise ValueError(f"unknown PRG {params.prg!r}")
        self.params = params
        self.run_id, self.round, self.attempt = params.run_id, params.round, params.attempt
        self.participants = list(params.participants)
        self.min_clients = min_clients
        self.plan = params.plan
        self.vector_len = params.vector_len
        self.identities = identities
        self.batches = batches
        self._incomplete: dict[frozenset[int], tuple[np.ndarray, set[int]]] = {}  # a batch's inputs so far
        self.degree = params.degree or None
        self.threshold = params.threshold
        self.prg: Prg = params.prg  # type: ignore[assignment]
        self.stage = ServerStage.ADVERTISE
        self.ctx = params.context
        self._waiting: set[int] = set(self.participants)
        self._answered: set[int] = set()  # who answered in the current stage
        self._lost: set[int] = set()
        self.keys: dict[int, _Keys] = {}
        self.nbrs: dict[int, list[int]] = {}
        self._outbox: dict[int, list[list]] = {}
        self.delivered_from: dict[int, list[int]] = {}
        self.sum = np.zeros(self.vector_len, dtype=self.plan.dtype)
        self.u2: list[int] = []
        self.u3: list[int] = []
        self.u4: list[int] = []
        self._sigs: dict[int, tuple[list[int], bytes]] = {}
        self._b_shares: dict[int, dict[int, tuple[int, int]]] = {}
        self._s_shares: dict[int, dict[int, tuple[int, int]]] = {}
        self.result: SecAggResult | None = None
        self._announced: SecAggResult | None = None  # the unmasked sum, until every survivor vouched
        self._challenge: tuple[bytes, np.ndarray, np.ndarray] | None = None  # (seed, u, v)
        self._vouches: dict[int, tuple[bytes, bytes]] = {}
        self.abort_cause: AbortCause | None = None
        self.abort_reason: str | None = None  # the detail, for people
        self.stage_sites: dict[str, list[int]] = {}
        # validate, then record: one handler per message type the table takes
        self._handlers = {AdvertiseKeys: self._on_keys, ShareKeys: self._on_shares, MaskedInput: self._on_masked,
                          ConsistencySig: self._on_sig, UnmaskResponse: self._on_unmask, SumVouch: self._on_vouch}
        # what closes each stage: it fires StageClosed or StageFailed
        self._closers = {ServerStage.ADVERTISE: self._close_advertise, ServerStage.SHARE: self._close_share,
                         ServerStage.MASKED_INPUT: self._close_masked, ServerStage.CONSISTENCY: self._close_consistency,
                         ServerStage.UNMASK: self._finish, ServerStage.VERIFY: self._close_verify}

    @property
    def finished(self) -> bool:
        return self.stage in (ServerStage.DONE, ServerStage.ABORTED)

    def start(self) -> list[Outbound]:
        msg = SecAggStart(self.round, self.attempt, self.participants, self.vector_len, self.plan.to_dict(), self.prg,
                          self.params.degree, self.threshold)
        return [Outbound(s, msg) for s in self.participants]

    # -- events ----------------------------------------------------------------------------------

    def receive(self, site: int, msg: Message) -> list[Outbound]:
        if (msg.round, msg.attempt) != (self.round, self.attempt):  # type: ignore[attr-defined]
            if (msg.round, msg.attempt) < (self.round, self.attempt):  # type: ignore[attr-defined]
                return []
            raise ProtocolViolation(site, "secure-aggregation message for a round never started")
        if site in self._lost:
            return []  # dropped earlier (timeout or disconnect): its late words change nothing
        after = SERVER_TRANSITIONS.get((self.stage, type(msg)))
        if after is None:
            raise ProtocolViolation(site, f"{type(msg).__name__} out of stage ({self.stage.value})")
        if site not in self._waiting:
            raise ProtocolViolation(site, f"second or unasked-for {type(msg).__name__}")
        self._handlers[type(msg)](site, msg)
        self.stage = after
        self._waiting.discard(site)
        self._answered.add(site)
        return self._maybe_advance()

    def site_lost(self, site: int) -> list[Outbound]:
        self._lost.add(site)
        if site in self._waiting:
            self._waiting.discard(site)
            return self._maybe_advance()
        return []

    def stage_timed_out(self) -> list[Outbound]:
        """Whoever has not answered in this stage is treated as dropped from here on."""
        if self.finished:
            return []
        self._lost |= self._waiting
        self._waiting.clear()
        return self._maybe_advance()

    # -- handlers (validate, then record) ---------------------------------------------------------

    def _on_keys(self, site: int, msg: AdvertiseKeys) -> None:
        ident = self.identities.get(site)
        if ident is None:
            raise ProtocolViolation(site, "no identity key on record")
        try:
            ident.verify(keys_message(self.ctx, site, msg.c_pk, msg.s_pk), msg.signature)
        except AuthenticationFailed:
            raise ProtocolViolation(site, "key advertisement signature does not verify") from None
        self.keys[site] = _Keys(msg.c_pk, msg.s_pk, msg.signature)

    def _on_shares(self, site: int, msg: ShareKeys) -> None:
        recipients = {r for r, _ in msg.shares}
        if recipients != set(self.nbrs[site]):
            raise ProtocolViolation(site, "shares are not addressed to exactly its neighbours")
        for recipient, ct in msg.shares:
            self._outbox.setdefault(recipient, []).append([site, ct])

    def _on_masked(self, site: int, msg: MaskedInput) -> None:
        y = msg.vector["y"]
        if y.shape != (self.vector_len,) or y.dtype != self.plan.dtype:
            raise ProtocolViolation(site, f"masked input of shape {y.shape} {y.dtype}")
        if self.batches is None:
            self.sum += y  # wraps mod 2**bits, as the protocol needs
            return
        batch = self.batches.get(site, frozenset({site})) & set(self.u2)
        held, senders = self._incomplete.get(batch) or (np.zeros_like(self.sum), set())
        held += y
        senders.add(site)
        if senders == batch:
            self.sum += held
            self._incomplete.pop(batch, None)
        else:
            self._incomplete[batch] = (held, senders)

    def _on_sig(self, site: int, msg: ConsistencySig) -> None:
        try:
            self.identities[site].verify(survivors_message(self.ctx, self.u3, msg.masked_with), msg.signature)
        except AuthenticationFailed:
            raise ProtocolViolation(site, "survivor-list signature does not verify") from None
        self._sigs[site] = (list(msg.masked_with), msg.signature)

    def _on_unmask(self, site: int, msg: UnmaskResponse) -> None:
        dropped = set(self.u2) - set(self.u3)
        for owner, raw in msg.b_shares:
            if owner not in self.u3 or site not in self._group(owner):
                raise ProtocolViolation(site, f"b share of site {owner} it should not hold or reveal")
            self._b_shares.setdefault(owner, {})[site] = _decode(site, raw)
        for owner, raw in msg.s_shares:
            if owner not in dropped or site not in self._group(owner):
                raise ProtocolViolation(site, f"key share of site {owner} it should not hold or reveal")
            self._s_shares.setdefault(owner, {})[site] = _decode(site, raw)

    def _on_vouch(self, site: int, msg: SumVouch) -> None:
        assert self._challenge is not None
        seed = self._challenge[0]
        try:
            verify.decode_scalars(msg.scalars, self.plan.bits)
            self.identities[site].verify(verify.vouch_message(self.ctx, seed, site, msg.scalars), msg.signature)
        except ValueError:
            raise ProtocolViolation(site, f"vouch of {len(msg.scalars)} bytes for a {self.plan.bits}-bit ring") from None
        except AuthenticationFailed:
            raise ProtocolViolation(site, "vouch signature does not verify") from None
        self._vouches[site] = (msg.scalars, msg.signature)

    def _group(self, owner: int) -> list[int]:
        return [owner, *self.nbrs.get(owner, [])]

    # -- stage transitions (the table in _states.py; each closer fires StageClosed or StageFailed) ---

    def _enter(self, event: type) -> None:
        self.stage = SERVER_TRANSITIONS[(self.stage, event)]  # a KeyError here is a bug: see _states.py

    def _abort(self, cause: AbortCause, reason: str) -> list[Outbound]:
        self._enter(StageFailed)
        self.abort_cause, self.abort_reason = cause, reason
        self.sum = np.zeros(0, dtype=self.plan.dtype)  # nothing of the masked sum outlives an abort
        self._announced = None  # nor an unverified sum
        return []

    def _alive(self, sites: list[int] | set[int]) -> list[int]:
        return sorted(s for s in sites if s not in self._lost)

    def _maybe_advance(self) -> list[Outbound]:
        # A stage can begin with nobody to wait for (each expected site answered the last stage,
        # then went): it closes at once, not at its deadline.
        out: list[Outbound] = []
        while not self._waiting and not self.finished:
            answered, self._answered = sorted(self._answered), set()
            out += self._closers[self.stage](answered)
        return out

    def _close_advertise(self, answered: list[int]) -> list[Outbound]:
        u1 = complete_batches(answered, self.batches)
        self.stage_sites["advertised"] = u1
        if len(u1) < self.min_clients:
            return self._abort(AbortCause.TOO_FEW_SITES, f"{len(u1)} sites advertised keys, fewer than min_clients={self.min_clients}")
        self.nbrs = neighbours(u1, self.degree, graph_seed(self.ctx, u1))
        group = 1 + (len(u1) - 1 if self.degree is None else min(self.degree, len(u1) - 1))
        if group < self.threshold:
            return self._abort(AbortCause.THRESHOLD, f"{len(u1)} sites advertised keys: groups of {group} cannot meet threshold "
                               f"{self.threshold}")
        out = []
        for u in u1:
            entries = [[v, self.keys[v].c_pk, self.keys[v].s_pk, self.keys[v].signature]
                       for v in mask_peers(u, self.nbrs[u], u1, self.batches)]
            out.append(Outbound(u, KeyRoster(self.round, self.attempt, u1, entries)))
        self._enter(StageClosed)
        self._waiting = set(self._alive(u1))
        return out

    def _close_share(self, answered: list[int]) -> list[Outbound]:
        self.u2 = complete_batches(self._alive(answered), self.batches)
        self.stage_sites["shared"] = self.u2
        if len(self.u2) < self.min_clients:
            return self._abort(AbortCause.TOO_FEW_SITES, f"{len(self.u2)} sites shared keys, fewer than min_clients={self.min_clients}")
        out = []
        u2 = set(self.u2)
        for u in self.u2:
            items = sorted((it for it in self._outbox.get(u, []) if it[0] in u2), key=lambda it: it[0])  # senders ascending (SPEC §6)
            self.delivered_from[u] = sorted(it[0] for it in items)
            out.append(Outbound(u, ShareDelivery(self.round, self.attempt, items)))
        self._outbox = {}
        self._enter(StageClosed)
        self._waiting = set(self.u2)
        return out

    def _close_masked(self, answered: list[int]) -> list[Outbound]:
        self.u3 = complete_batches(answered, self.batches)  # an incomplete batch's inputs never reached the sum
        self._incomplete.clear()
        self.stage_sites["masked"] = self.u3
        if len(self.u3) < self.min_clients:
            return self._abort(AbortCause.TOO_FEW_SITES, f"{len(self.u3)} masked inputs, fewer than "
                               f"min_clients={self.min_clients}; nothing unmasked")
        self._enter(StageClosed)
        self._waiting = set(self._alive(self.u3))  # a site gone since its input still counts in U3
        return [Outbound(u, ConsistencyCheck(self.round, self.attempt, self.u3)) for u in self.u3]

    def _close_consistency(self, answered: list[int]) -> list[Outbound]:
        self.u4 = answered
        self.stage_sites["signed"] = self.u4
        if len(self.u4) < self.min_clients:
            return self._abort(AbortCause.TOO_FEW_SITES, f"{len(self.u4)} survivor signatures, fewer than min_clients={self.min_clients}")
        if len(self.u4) < self.params.quorum:
            return self._abort(AbortCause.NO_QUORUM, f"{len(self.u4)} survivor signatures; the sites need a majority of the "
                               f"{len(self.participants)} participants ({self.params.quorum})")
        dropped = sorted(set(self.u2) - set(self.u3))
        sigs = [[s, *self._sigs[s]] for s in self.u4]
        self._enter(StageClosed)
        self._waiting = set(self._alive(self.u4))
        return [Outbound(u, UnmaskRequest(self.round, self.attempt, self.u3, dropped, sigs)) for u in self.u4]

    def _finish(self, _answered: list[int]) -> list[Outbound]:
        """UNMASK closed: rebuild what the shares allow and remove the masks from the sum."""
        t = self.threshold
        total = self.sum
        removals: list[tuple[int, bytes]] = []
        for u in self.u3:
            shares = list(self._b_shares.get(u, {}).values())
            if len(shares) < t:
                return self._abort(AbortCause.UNMASK_FAILED, f"only {len(shares)} shares of site {u}'s mask seed, {t} needed")
            try:
                removals.append((-1, shamir.reconstruct(shares, t)))
            except ValueError:  # no VSS: a site sent a wrong share, and which one cannot be told
                return self._abort(AbortCause.UNMASK_FAILED, f"inconsistent shares of site {u}'s mask seed")
        survivors = set(self.u3)
        for v in sorted(set(self.u2) - survivors):
            shares = list(self._s_shares.get(v, {}).values())
            if len(shares) < t:
                return self._abort(AbortCause.UNMASK_FAILED, f"only {len(shares)} shares of dropped site {v}'s key, {t} needed")
            try:
                secret = shamir.reconstruct(shares, t)
            except ValueError:
                return self._abort(AbortCause.UNMASK_FAILED, f"inconsistent key shares for dropped site {v}")
            key = EphemeralKey(secret)
            if key.public != self.keys[v].s_pk:
                return self._abort(AbortCause.UNMASK_FAILED, f"reconstructed key of dropped site {v} does not match its advertisement")
            for u in self.nbrs[v]:
                # u masked with v iff v's shares were delivered to u (v in U2 ∩ N(u)).
                if u in survivors and v in self.delivered_from.get(u, []):
                    removals.append((-sign(u, v), pair_seed(key, self.keys[u].s_pk, u, v, self.ctx)))
        # Self masks are removed like pair masks with sign -1 (PRG(b_u) was added).
        add_masks(total, None, removals, prg=self.prg)
        self._enter(StageClosed)
        digest, seed, (u, v) = verify.challenge_of(self.ctx, total, self.u3)
        self._challenge = (seed, u, v)
        self._announced = SecAggResult(total, list(self.u3), sorted(set(self.participants) - survivors),
                                       self.stage_sites, sum_digest=digest)
        # every survivor must vouch, gone or not: a missing vouch leaves the round unverified
        self._waiting = set(self._alive(self.u3))
        announce = SumAnnounce(self.round, self.attempt, {"s": total})
        return [Outbound(u, announce) for u in sorted(self._waiting)]

    def _close_verify(self, answered: list[int]) -> list[Outbound]:
        """VERIFY closed: every survivor's vouch, adding up to the sum, goes to each of them."""
        result, challenge = self._announced, self._challenge
        assert result is not None and challenge is not None
        missing = sorted(set(self.u3) - set(answered))
        self.stage_sites["vouched"] = answered
        if missing:
            return self._abort(AbortCause.UNVERIFIED, f"survivors {missing} did not vouch for the sum: "
                                                      "no site will adopt it")
        _, u, v = challenge
        vouched = verify.vouched_total((self._vouches[s][0] for s in self.u3), self.plan.bits)
        if vouched != verify.project(result.total, u=u, v=v)[0]:
            return self._abort(AbortCause.UNVERIFIED, "the survivors' vouches do not add up to the unmasked sum "
                                                      "(a site vouched for another input than it masked)")
        self._enter(StageClosed)
        result.vouches = [[s, *self._vouches[s]] for s in self.u3]
        self.result, self._announced = result, None
        proof = SumProof(self.round, self.attempt, result.vouches)
        return [Outbound(s, proof) for s in self._alive(self.u3)]


def _decode(site: int, raw: bytes) -> tuple[int, int]:
    try:
        return shamir.decode_share(raw)
    except ValueError:
        raise ProtocolViolation(site, "malformed share") from None
