"""The site's side of secure aggregation: a sans-IO state machine (messages in, messages out).

Stages, one round attempt at a time: IDLE -> ADVERTISED -> SHARED -> READY -> MASKED -> SIGNED ->
UNMASKED -> VOUCHED -> VERIFIED, or ABORTED on any refusal.  The transitions are ``CLIENT_TRANSITIONS`` in ``_states.py``
(drawn in protocol/SPEC.md §7); a message the table does not take in the current stage is refused.

The site decides; the coordinator only proposes.  Every check goes through the site's
:class:`~asagiri.policy.SitePolicy` (a ``checks.SiteChecks``); a failed one raises ``Refusal`` (also
exported here as ``SecAggRefused``) and leaves the machine ``ABORTED`` for that round: the site
says nothing more, so nothing it holds can be extracted.  What a coordinator running modified code
cannot get past (docs/secagg.md has the argument):

- **One round for everyone.**  The site derives the quantisation plan, graph degree and threshold
  from the run's spec itself and refuses others; it signs the round digest (``binding.py``) over
  everything it was given, so a peer that was given anything else fails to verify its signature.
- **Real peers only.**  Every participant must have a pinned identity key, every neighbour's keys
  must be signed by it, and there must be at least ``policy.min_participants`` of them.
- **No replay.**  A round that is not newer than the last one entered (``ReplayGuard``, persisted
  by the runtime) is refused before any key is made.
- **A certified survivor list.**  The unmask request must carry signatures on the very list this
  site signed from a majority of the round's participants, so no two lists can both be
  certified; each signer also signed whom it masked with.
- **No small sums.**  The survivors joined to this site by masks both sides added (its
  *component*) must number at least ``policy.min_participants``: any sum the coordinator can
  unmask that contains this site's input contains theirs too.
- **No sum it can be subtracted out of.**  With the run's participation batches, the
  participants, the advertised sites and the survivors must each be whole batches, and the site
  masks with its whole batch (``graph.batch_mates``) besides its graph neighbours, so every sum
  the coordinator can unmask, in any round or attempt, holds whole batches (docs/secagg.md,
  "Participation batches").
- One unmask per round, and each peer's b share *or* its masking-key share, never both
  (``sharing.HeldShares.reveal`` keeps that one itself).
- **A verified sum.**  After unmasking, the site vouches for the announced sum once, and adopts
  it (``verified``) only when every certified survivor's signed vouch adds up to it (``verify.py``,
  SPEC §6.8): a coordinator that relays the vouches for anything but the survivors' true sum is
  caught, and one that sends no proof gets no sum adopted.

Over 400 lines on purpose: one state machine, whose stages read top to bottom in the order of
protocol/SPEC.md §6.4 and §7.2; its pieces (stage table, binding, graph, component, replay,
masking, sharing) live in their own modules.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import msgpack
import numpy as np

from ..errors import Refusal
from ..wire.crypto import AuthenticationFailed, EphemeralKey, Identity, StreamCipher, blake2b
from ..wire.crypto import random_bytes as _csprng
from ..wire.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySig,
    FitIns,
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
from ._states import CLIENT_MESSAGES, CLIENT_TRANSITIONS, ClientStage, LocalUpdate, Refused
from .binding import RoundParams, keys_message, params_digest, survivors_message, vector_len
from .checks import SiteChecks
from .component import component_survives, mutual_masks
from .graph import batch_mates, graph_seed, mask_peers, neighbours
from .masking import add_masks, pair_seed, sign
from .prg import PRGS
from .quantize import QuantisationError, quantize
from .replay import ReplayGuard
from .rules import SecAggSettings, batch_map
from .sharing import BothShares, HeldShares
from .verify import VerifiedSum

__all__ = ["ClientStage", "ClientStateMachine", "ReplayGuard", "SecAggRefused", "VerifiedSum"]

SecAggRefused = Refusal  # the name the runtime and the tests know this refusal by

# What a malformed field surfaces as inside the checks; each becomes a ``malformed`` refusal.
_MALFORMED = (TypeError, ValueError, KeyError, IndexError, OverflowError, struct.error, msgpack.UnpackException)


def share_key(my_c: EphemeralKey, peer_c_pk: bytes, sender: int, recipient: int, ctx: bytes) -> bytes:
    """Directional AEAD key for shares sender -> recipient; derived from X25519, unknown to the coordinator."""
    return blake2b(my_c.agree(peer_c_pk) + ctx + struct.pack(">II", sender, recipient), person=b"asagiri-share")


@dataclass(frozen=True)
class _Fit:
    round: int
    attempt: int
    params_digest: bytes
    config: dict
    vector_len: int


@dataclass(frozen=True)
class _Announced:
    """The sum this site vouched for, and what it needs to check the proof."""

    total: np.ndarray
    digest: bytes
    seed: bytes
    scalars: bytes
    expected: list[int]  # <r_k, S>: what the vouches must add up to


@dataclass
class _Round:
    params: RoundParams
    c: EphemeralKey
    s: EphemeralKey
    b_seed: bytes
    advertised: list[int] = field(default_factory=list)  # U1 as this site was told
    group: list[int] = field(default_factory=list)  # [me] + neighbours, the Shamir x order
    peer_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # id -> (c_pk, s_pk)
    held: HeldShares = field(default_factory=HeldShares)  # owner -> (b share, s share), and what left
    masked_with: list[int] = field(default_factory=list)  # neighbours whose shares arrived
    survivors: list[int] | None = None
    input: tuple[np.ndarray, int] | None = None
    plain: np.ndarray | None = None  # the quantised input as masked, until this site vouched for a sum
    announced: _Announced | None = None

    @property
    def rnd(self) -> int:
        return self.params.round

    @property
    def attempt(self) -> int:
        return self.params.attempt

    @property
    def ctx(self) -> bytes:
        return self.params.context


class ClientStateMachine:
    def __init__(
        self,
        *,
        site_id: int,
        identity: Identity,
        run_id: str,
        secagg: SecAggSettings,
        spec_digest: bytes,
        policy: SiteChecks,
        replay: ReplayGuard | None = None,
        random_bytes: Callable[[int], bytes] = _csprng,
        controls: bool = False,
    ) -> None:
        self.site_id = site_id
        self.controls = controls  # the run sums SCAFFOLD's control variates too (SPEC §6.3)
        self.identity = identity
        self.run_id = run_id
        self.secagg = secagg
        self.spec_digest = spec_digest
        self.policy = policy
        self.batches = batch_map(getattr(secagg, "batches", None))  # the site's policy checked them on Welcome
        self.replay = replay if replay is not None else ReplayGuard()
        self._random = random_bytes
        self.stage = ClientStage.IDLE
        self._fit: _Fit | None = None
        self._newest_fit: tuple[int, int] = (0, 0)  # the newest FitIns seen, accepted or not
        self._round: _Round | None = None
        self.clipped = 0
        self.verified: VerifiedSum | None = None  # the last sum this site verified
        self._plain_buffer: np.ndarray | None = None  # reused round to round: no page faults per round
        self._handlers: dict[type, Callable] = {
            FitIns: self._fit_ins, SecAggStart: self._start, KeyRoster: self._roster, ShareDelivery: self._deliver,
            ConsistencyCheck: self._consistency, UnmaskRequest: self._unmask, SumAnnounce: self._announce,
            SumProof: self._proof,
        }

    @property
    def peers(self) -> dict:
        return self.policy.peers

    @property
    def fit_binding(self) -> tuple[bytes, dict] | None:
        """(params digest, config) of the FitIns accepted last: what ``set_input``'s ``trained_on``
        must be for an update trained from it."""
        return None if self._fit is None else (self._fit.params_digest, self._fit.config)

    @property
    def round_key(self) -> tuple[int, int] | None:
        """(round, attempt) of the round in progress, if any."""
        return None if self._round is None else (self._round.rnd, self._round.attempt)

    # -- entry points ----------------------------------------------------------------------------

    def receive(self, msg: Message) -> list[Message]:
        """Feed one message from the coordinator; returns what to send back (maybe nothing)."""
        return self._guarded(lambda: self._receive(msg), type(msg).__name__)

    def set_input(self, delta: np.ndarray, num_samples: int, *, trained_on: tuple[bytes, dict]) -> list[Message]:
        """The local update (float, flattened shared parameters) and the sample count it weighs.

        ``trained_on``: the params digest and config of the FitIns the update was trained from,
        which must be the ones this round's digest signed.
        """
        def step() -> list[Message]:
            r = self._current()
            self._check(trained_on == (r.params.params_digest, dict(r.params.fit_config)), "round_params",
                        "the update was trained on another model or config than the round signed")
            self._check(delta.size + 1 == r.params.vector_len, "round_params",
                        f"update has {delta.size} values, the round expects {r.params.vector_len - 1}")
            r.input = (delta, num_samples)
            return self._maybe_mask()

        return self._guarded(step, "the local update")

    def set_quantized(self, ring_vector: np.ndarray) -> list[Message]:
        """Mask an already quantised ring vector (last element: the sample count) as it is.

        The seam property tests use to check that masks cancel exactly on arbitrary ring values.
        """
        def step() -> list[Message]:
            r = self._current()
            plan = r.params.plan
            self._check(ring_vector.shape == (r.params.vector_len,) and ring_vector.dtype == plan.dtype,
                        "round_params", f"ring vector must be {r.params.vector_len} x {np.dtype(plan.dtype)}")
            r.input = (ring_vector.copy(), -1)
            return self._maybe_mask()

        return self._guarded(step, "the ring vector")

    def _guarded(self, step: Callable[[], list[Message]], what: str) -> list[Message]:
        try:
            return step()
        except Refusal:
            self._enter(Refused)
            raise
        except _MALFORMED as exc:
            self._enter(Refused)
            self.policy.refuse("malformed", f"{what}: {type(exc).__name__}: {exc}")

    # -- helpers ---------------------------------------------------------------------------------

    def _check(self, ok: bool, rule: str, detail: str) -> None:
        self.policy.require(ok, rule, detail)

    def _peer_signed(self, site: int, text: bytes, signature: bytes, rule: str, detail: str) -> None:
        """``site`` has a pinned identity key and signed ``text`` with it; else a refusal."""
        peer = self.peers.get(site)
        self._check(peer is not None, "pinned_peers", f"site {site} has no pinned identity key")
        try:
            peer.verify(text, signature)
        except AuthenticationFailed:
            self.policy.refuse(rule, detail)

    def _current(self) -> _Round:
        if self._round is None:
            self.policy.refuse("stage", "no secure-aggregation round in progress")
        return self._round

    def _check_round(self, msg: Message) -> _Round:
        r = self._current()
        got = (msg.round, msg.attempt)  # type: ignore[attr-defined]
        self._check(got == (r.rnd, r.attempt), "stage",
                    f"{type(msg).__name__} for round {got[0]}.{got[1]}, this site is in {r.rnd}.{r.attempt}")
        return r

    def _enter(self, event: type) -> None:
        """Take the table's transition for ``event`` (its handler's checks all passed)."""
        self.stage = CLIENT_TRANSITIONS[(self.stage, event)]

    def _receive(self, msg: Message) -> list[Message]:
        kind = type(msg)
        if (self.stage, kind) not in CLIENT_TRANSITIONS:
            if self.stage is ClientStage.ABORTED:
                self.policy.refuse("stage", "this site already left the round")
            if kind in CLIENT_MESSAGES:
                self.policy.refuse("stage", f"message out of order in stage {self.stage.value}")
            self.policy.refuse("stage", f"{kind.__name__} is not a secure-aggregation message")
        return self._handlers[kind](msg)

    # -- stages ----------------------------------------------------------------------------------

    def _fit_ins(self, msg: FitIns) -> list[Message]:
        """Remember the round's global model and config: they are bound into what this site signs.

        One FitIns per round attempt: a second one could have the site train on one model while
        it signs another.
        """
        last = max(self._newest_fit, self.replay.last(self.run_id))
        self._newest_fit = max(self._newest_fit, (msg.round, msg.attempt))  # refusals never lower it
        if (msg.round, msg.attempt) <= last:
            self._fit = None  # nothing of this round attempt goes ahead now
            self.policy.refuse("replay", f"FitIns for round {msg.round}.{msg.attempt}, not newer than "
                                         f"{last[0]}.{last[1]}")
        length = vector_len(msg.params, controls=self.controls)
        self._fit = _Fit(msg.round, msg.attempt, params_digest(msg.params), dict(msg.config), length)
        self._enter(FitIns)
        return []

    def _start(self, msg: SecAggStart) -> list[Message]:
        fit = self._fit
        self._check(fit is not None and (fit.round, fit.attempt) == (msg.round, msg.attempt), "stage",
                    f"SecAggStart for round {msg.round}.{msg.attempt} without that round's FitIns")
        assert fit is not None
        last = self.replay.last(self.run_id)
        self._check((msg.round, msg.attempt) > last, "replay",
                    f"round {msg.round}.{msg.attempt} is not newer than {last[0]}.{last[1]}, the last one entered")
        participants = sorted(msg.participants)
        self._check(self.site_id in participants, "stage", "this site is not among the round's participants")
        self.policy.check_participants("participants", participants)
        self.policy.check_pinned(participants)
        self.policy.check_whole_batches("participants", participants, self.batches)
        # The site's own derivation, from the spec every participant signs over.
        try:
            params = RoundParams.derive(
                run_id=self.run_id, round=msg.round, attempt=msg.attempt, participants=participants,
                secagg=self.secagg, params_digest=fit.params_digest, fit_config=fit.config,
                vector_len=fit.vector_len, spec_digest=self.spec_digest,
            )
        except QuantisationError as exc:
            self.policy.refuse("round_params", str(exc))
        own = params.plan.to_dict()
        self._check(_same(msg.quant, own), "round_params", f"quantisation plan {msg.quant} differs from this site's {own}")
        self._check(msg.prg == params.prg and msg.prg in PRGS, "round_params",
                    f"mask PRG {msg.prg!r}; the run's spec says {params.prg!r}")
        self._check((msg.degree, msg.threshold) == (params.degree, params.threshold), "round_params",
                    f"degree {msg.degree}, threshold {msg.threshold}; the spec gives {params.degree}, {params.threshold}")
        self._check(msg.vector_len == params.vector_len, "round_params",
                    f"vector_len {msg.vector_len}, but the round's model flattens to {params.vector_len - 1} + 1")
        self.policy.check_group(len(participants) if params.degree == 0 else params.degree + 1, params.threshold)
        # Persisted before anything leaves: a restarted site cannot be walked back into this round.
        self._check(self.replay.advance(self.run_id, msg.round, msg.attempt), "replay",
                    f"round {msg.round}.{msg.attempt} was entered before")
        c, s = EphemeralKey(self._random(32)), EphemeralKey(self._random(32))
        self._round = _Round(params, c, s, self._random(32))
        self._enter(SecAggStart)
        sig = self.identity.sign(keys_message(params.context, self.site_id, c.public, s.public))
        return [AdvertiseKeys(msg.round, msg.attempt, c.public, s.public, sig)]

    def _roster(self, msg: KeyRoster) -> list[Message]:
        r = self._check_round(msg)
        p = r.params
        advertised = sorted(msg.advertised)
        self._check(self.site_id in advertised, "stage", "the roster leaves this site out")
        self._check(set(advertised) <= set(p.participants), "round_params",
                    f"sites {sorted(set(advertised) - set(p.participants))} advertised but are not participants")
        self.policy.check_participants("sites advertised keys", advertised)
        self.policy.check_whole_batches("sites that advertised keys", advertised, self.batches)
        nbrs = neighbours(advertised, p.degree or None, graph_seed(p.context, advertised))[self.site_id]
        group = [self.site_id, *nbrs]
        self.policy.check_group(len(group), p.threshold)
        peers = mask_peers(self.site_id, nbrs, advertised, self.batches)
        entries = {e[0]: e for e in msg.entries}
        self._check(set(entries) == set(peers), "stage",
                    "the roster's keys are not exactly this site's neighbours and batch-mates")
        own = (r.c.public, r.s.public)
        for v in peers:
            _, c_pk, s_pk, sig = entries[v]
            self._peer_signed(v, keys_message(p.context, v, c_pk, s_pk), sig, "signature",
                              f"site {v}'s key advertisement does not verify for this round")
            self._check(c_pk not in own and s_pk not in own, "signature", "a neighbour advertises this site's own key")
            r.peer_keys[v] = (c_pk, s_pk)
        r.advertised, r.group = advertised, group
        b_shares = shamir.split(r.b_seed, len(group), p.threshold, rng=self._random)
        s_shares = shamir.split(r.s.secret_bytes(), len(group), p.threshold, rng=self._random)
        out = []
        for i, v in enumerate(group):
            b, s = shamir.encode_share(b_shares[i]), shamir.encode_share(s_shares[i])
            if v == self.site_id:
                r.held[v] = (b, s)
                continue
            plain = msgpack.packb([self.run_id, r.rnd, r.attempt, self.site_id, v, b, s], use_bin_type=True)
            key = share_key(r.c, r.peer_keys[v][0], self.site_id, v, r.ctx)
            out.append([v, StreamCipher(key).seal(0, plain, r.ctx)])
        self._enter(KeyRoster)
        return [ShareKeys(r.rnd, r.attempt, out)]

    def _deliver(self, msg: ShareDelivery) -> list[Message]:
        r = self._check_round(msg)
        for sender, ct in msg.shares:
            self._check(sender in r.group[1:], "shares", f"a share from site {sender}, which is not a neighbour")
            key = share_key(r.c, r.peer_keys[sender][0], sender, self.site_id, r.ctx)
            try:
                plain = StreamCipher(key).open(0, ct, r.ctx)
                run_id, rnd, attempt, frm, to, b, s = msgpack.unpackb(plain, raw=False)
                if [run_id, rnd, attempt, frm, to] != [self.run_id, r.rnd, r.attempt, sender, self.site_id]:
                    raise ValueError("wrong context")
                shamir.decode_share(b), shamir.decode_share(s)
            except (AuthenticationFailed, *_MALFORMED):
                self.policy.refuse("shares", f"the share from site {sender} does not verify")
            r.held[sender] = (b, s)
        r.masked_with = sorted(int(sender) for sender, _ in msg.shares)
        self._check(len(r.masked_with) + 1 >= r.params.threshold, "shares",
                    f"only {len(r.masked_with)} neighbours shared keys; threshold {r.params.threshold}")
        # Its whole batch too, shares or not: a batch is summed whole, so those masks never need removing.
        r.masked_with = sorted(set(r.masked_with) | set(batch_mates(self.site_id, r.advertised, self.batches)))
        self._enter(ShareDelivery)
        return self._maybe_mask()

    def _maybe_mask(self) -> list[Message]:
        r = self._current()
        if r.input is None or (self.stage, LocalUpdate) not in CLIENT_TRANSITIONS:
            return []  # the update waits for the shares (READY), or there is none yet
        delta, n = r.input
        plan, prg = r.params.plan, r.params.prg
        masks = [(1, r.b_seed)] + [
            (sign(self.site_id, v), pair_seed(r.s, r.peer_keys[v][1], self.site_id, v, r.ctx)) for v in r.masked_with
        ]
        plain = self._plain_buffer
        if plain is None or plain.shape != (r.params.vector_len,) or plain.dtype != plan.dtype:
            plain = self._plain_buffer = np.empty(r.params.vector_len, dtype=plan.dtype)
        if n == -1:  # set_quantized: already a ring vector
            plain[:] = delta
            q = add_masks(delta, None, masks, prg=prg)  # type: ignore[arg-type]
        else:
            n = min(n, plan.max_samples)
            try:
                q, self.clipped = quantize(delta, n, plan, noise_seed=self._random(32), masks=masks, prg=prg,  # type: ignore[arg-type]
                                           plain=plain)
            except QuantisationError as exc:
                self.policy.refuse("malformed", str(exc))
        r.plain = plain
        r.input = None
        self._enter(LocalUpdate)
        return [MaskedInput(r.rnd, r.attempt, {"y": q})]

    def _consistency(self, msg: ConsistencyCheck) -> list[Message]:
        r = self._check_round(msg)
        survivors = sorted(msg.survivors)
        self._check(self.site_id in survivors, "survivors", "the survivor list leaves this site out")
        strangers = sorted(set(survivors) - set(r.advertised))
        self._check(not strangers, "survivors", f"survivors {strangers} never advertised keys in this round")
        self.policy.check_participants("survivors", survivors)
        self.policy.check_whole_batches("survivors", survivors, self.batches)
        in_group = [v for v in r.group if v in survivors]
        unmasked = sorted(set(in_group) - set(r.masked_with) - {self.site_id})
        self._check(not unmasked, "survivors", f"neighbours {unmasked} are listed as survivors but never shared keys")
        self._check(len(in_group) >= r.params.threshold, "survivors",
                    "fewer survivors in this site's group than the threshold")
        r.survivors = survivors
        self._enter(ConsistencyCheck)
        sig = self.identity.sign(survivors_message(r.ctx, survivors, r.masked_with))
        return [ConsistencySig(r.rnd, r.attempt, list(r.masked_with), sig)]

    def _unmask(self, msg: UnmaskRequest) -> list[Message]:
        r = self._check_round(msg)
        survivors, dropped = sorted(msg.survivors), sorted(msg.dropped)
        self._check(survivors == r.survivors, "survivors", "the survivor list differs from the one this site signed")
        self._check(not set(survivors) & set(dropped), "survivors", "survivor and dropout lists overlap")
        self._check(set(dropped) <= set(r.advertised), "survivors", "dropped sites that never advertised keys")
        claims: dict[int, list[int]] = {self.site_id: r.masked_with}
        for signer, masked, sig in msg.signatures:
            if signer == self.site_id:
                continue  # this site knows what it signed
            self._check(signer in survivors, "quorum", f"a survivor-list signature from site {signer}, not a survivor")
            self._peer_signed(signer, survivors_message(r.ctx, survivors, masked), sig, "signature",
                              f"site {signer}'s signature on the survivor list does not verify")
            claims[signer] = list(masked)
        # the run's colluders as well as this site's: every holder of this site's shares enforces the run's
        quorum = max(self.policy.quorum(len(r.params.participants)), r.params.quorum)
        self._check(len(claims) >= quorum, "quorum",
                    f"{len(claims)} signatures on this survivor list; {quorum} of the "
                    f"{len(r.params.participants)} participants are needed")
        policy = self.policy.cfg
        self.policy.check_component(*component_survives(
            self.site_id, mutual_masks(survivors, claims), needed=policy.min_participants,
            colluders=policy.colluders,
        ))
        try:
            b_out, s_out = r.held.reveal(survivors, dropped)
        except BothShares as exc:
            self.policy.refuse("stage", str(exc))
        self._enter(UnmaskRequest)
        return [UnmaskResponse(r.rnd, r.attempt, b_out, s_out)]

    def _announce(self, msg: SumAnnounce) -> list[Message]:
        """Vouch for the announced sum: this site's own input, projected on the challenge the sum
        fixes, under pair masks that cancel only among survivors shown this very sum."""
        r = self._check_round(msg)
        p = r.params
        total = msg.total["s"]
        self._check(total.shape == (p.vector_len,) and total.dtype == p.plan.dtype, "round_params",
                    f"a sum of {total.shape} {total.dtype}; the round sums {p.vector_len} x {np.dtype(p.plan.dtype)}")
        assert r.plain is not None and r.survivors is not None  # masked and signed before UNMASKED
        digest, seed, (u, v) = verify.challenge_of(r.ctx, total, r.survivors)
        peers = {j: verify.vouch_key(r.s, r.peer_keys[j][1], self.site_id, j, r.ctx)
                 for j in r.masked_with if j in r.survivors}
        projected, expected = verify.project(r.plain, total, u=u, v=v)  # one pass over both
        own = verify.masked_scalars(projected, self.site_id, peers, seed, p.plan.bits)
        scalars = verify.encode_scalars(own, p.plan.bits)
        r.plain, r.announced = None, _Announced(total, digest, seed, scalars, expected)
        self._enter(SumAnnounce)
        sig = self.identity.sign(verify.vouch_message(r.ctx, seed, self.site_id, scalars))
        return [SumVouch(r.rnd, r.attempt, scalars, sig)]

    def _proof(self, msg: SumProof) -> list[Message]:
        """Adopt the sum only if every survivor vouched for it and the vouches add up to it."""
        r = self._check_round(msg)
        a, survivors = r.announced, r.survivors
        assert a is not None and survivors is not None  # vouched before VOUCHED
        vouches = {int(site): (scalars, sig) for site, scalars, sig in msg.vouches}
        problem = verify.vouches_problem(vouches, survivors, ctx=r.ctx, seed=a.seed, expected=a.expected,
                                         bits=r.params.plan.bits, peers=self.peers, own=(self.site_id, a.scalars))
        if problem is not None:
            self.policy.refuse(*problem)
        self.verified = VerifiedSum(r.rnd, r.attempt, a.total, a.digest, tuple(survivors), r.params.plan,
                                    r.params.params_digest)
        r.announced = None
        self._enter(SumProof)
        return []


def _same(got: object, want: Mapping[str, object]) -> bool:
    """Equal keys and values of the same types (a string scale or a float bit width differs)."""
    return (
        isinstance(got, dict)
        and set(got) == set(want)
        and all(type(got[k]) is type(v) and got[k] == v for k, v in want.items())
    )
