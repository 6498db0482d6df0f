"""The site's side of secure aggregation: a sans-IO state machine (messages in, messages out).

Stages (one round at a time)::

    IDLE --SecAggStart--> ADVERTISED --KeyRoster--> SHARED --ShareDelivery--> READY
    READY + input --> MASKED --ConsistencyCheck--> SIGNED --UnmaskRequest--> DONE

Any failed check raises :class:`SecAggRefused` and leaves the machine ``ABORTED`` for that round:
the site says nothing more, so nothing it holds can be extracted.  The checks a misbehaving
coordinator cannot get past:

- every neighbour's keys carry a valid signature by that neighbour's pinned identity key, over
  the run, round and attempt (no forged or replayed advertisements);
- the threshold is at least a majority of the sharing group;
- shares are decrypted with keys the coordinator cannot derive, and name sender, recipient, run,
  round and attempt;
- the survivor list must be signed by at least ``t`` survivors (the same list this site signed),
  disjoint from the dropped list, and large enough;
- one ``UnmaskRequest`` per round, answered with each peer's b share *or* its masking-key share,
  never both (``_revealed`` records it).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import msgpack
import numpy as np

from ..wire.crypto import AuthenticationFailed, EphemeralKey, Identity, PublicIdentity, StreamCipher, blake2b
from ..wire.crypto import random_bytes as _csprng
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
    UnmaskRequest,
    UnmaskResponse,
)
from . import shamir
from .graph import graph_seed, neighbours
from .masking import add_masks, pair_seed, round_context, sign
from .prg import PRGS, Prg
from .quantize import QuantisationError, QuantPlan, quantize

__all__ = ["ClientStage", "ClientStateMachine", "SecAggRefused", "keys_message", "survivors_message"]


class SecAggRefused(Exception):
    """This site refuses to continue the round: a check failed. It reveals nothing further."""


class ClientStage(enum.Enum):
    IDLE = "idle"
    ADVERTISED = "advertised"
    SHARED = "shared"
    READY = "ready"
    MASKED = "masked"
    SIGNED = "signed"
    DONE = "done"
    ABORTED = "aborted"


def keys_message(run_id: str, rnd: int, attempt: int, site: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return b"asagiri-secagg-keys\0" + round_context(run_id, rnd, attempt) + struct.pack(">I", site) + c_pk + s_pk


def survivors_message(run_id: str, rnd: int, attempt: int, survivors: list[int]) -> bytes:
    ids = b"".join(struct.pack(">I", s) for s in sorted(survivors))
    return b"asagiri-secagg-survivors\0" + round_context(run_id, rnd, attempt) + ids


def share_key(my_c: EphemeralKey, peer_c_pk: bytes, sender: int, recipient: int, ctx: bytes) -> bytes:
    """Directional AEAD key for shares sender -> recipient; derived from X25519, unknown to the coordinator."""
    return blake2b(my_c.agree(peer_c_pk) + ctx + struct.pack(">II", sender, recipient), person=b"asagiri-share")


@dataclass
class _Round:
    rnd: int
    attempt: int
    vector_len: int
    plan: QuantPlan
    prg: Prg
    c: EphemeralKey
    s: EphemeralKey
    b_seed: bytes
    ctx: bytes
    threshold: int = 0
    group: list[int] = field(default_factory=list)  # [me] + neighbours, the Shamir x order
    peer_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # id -> (c_pk, s_pk)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # owner -> (b share, s share)
    shared_with: list[int] = field(default_factory=list)  # neighbours whose shares arrived (U2 ∩ N(me))
    survivors: list[int] | None = None
    input: tuple[np.ndarray, int] | None = None


class ClientStateMachine:
    def __init__(
        self,
        *,
        site_id: int,
        identity: Identity,
        run_id: str,
        peers: Mapping[int, PublicIdentity],
        random_bytes: Callable[[int], bytes] = _csprng,
        min_survivors: int = 2,
    ) -> None:
        self.site_id = site_id
        self.identity = identity
        self.run_id = run_id
        self.peers = dict(peers)
        self._random = random_bytes
        self.min_survivors = min_survivors
        self.stage = ClientStage.IDLE
        self._round: _Round | None = None
        self._last: tuple[int, int] = (0, 0)
        self._revealed: dict[int, str] = {}
        self.clipped = 0

    @property
    def round_key(self) -> tuple[int, int] | None:
        """(round, attempt) of the round in progress, if any."""
        return None if self._round is None else (self._round.rnd, self._round.attempt)

    # -- entry points ----------------------------------------------------------------------------

    def receive(self, msg: Message) -> list[Message]:
        try:
            return self._receive(msg)
        except SecAggRefused:
            self.stage = ClientStage.ABORTED
            raise

    def set_input(self, delta: np.ndarray, num_samples: int) -> list[Message]:
        """The local update (float, flattened shared parameters) and the sample count it weighs."""
        r = self._current()
        if delta.size + 1 != r.vector_len:
            raise SecAggRefused(f"update has {delta.size} values, the round expects {r.vector_len - 1}")
        r.input = (delta, num_samples)
        try:
            return self._maybe_mask()
        except SecAggRefused:
            self.stage = ClientStage.ABORTED
            raise

    def set_quantized(self, ring_vector: np.ndarray) -> list[Message]:
        """Mask an already quantised ring vector (last element: the sample count) as it is.

        The seam property tests use to check that masks cancel exactly on arbitrary ring values.
        """
        r = self._current()
        if ring_vector.shape != (r.vector_len,) or ring_vector.dtype != r.plan.dtype:
            raise SecAggRefused(f"ring vector must be {r.vector_len} x {np.dtype(r.plan.dtype)}")
        r.input = (ring_vector.copy(), -1)
        return self._maybe_mask()

    # -- stages ----------------------------------------------------------------------------------

    def _current(self) -> _Round:
        if self._round is None:
            raise SecAggRefused("no secure-aggregation round in progress")
        return self._round

    def _check_round(self, msg: Message) -> _Round:
        r = self._current()
        if (msg.round, msg.attempt) != (r.rnd, r.attempt):  # type: ignore[attr-defined]
            raise SecAggRefused(
                f"{type(msg).__name__} for round {msg.round}.{msg.attempt}, "  # type: ignore[attr-defined]
                f"this site is in {r.rnd}.{r.attempt}"
            )
        return r

    def _expect(self, *stages: ClientStage) -> None:
        if self.stage not in stages:
            raise SecAggRefused(f"message out of order in stage {self.stage.value}")

    def _receive(self, msg: Message) -> list[Message]:
        if isinstance(msg, SecAggStart):
            return self._start(msg)
        if self.stage is ClientStage.ABORTED:
            raise SecAggRefused("this site already left the round")
        if isinstance(msg, KeyRoster):
            return self._roster(msg)
        if isinstance(msg, ShareDelivery):
            return self._deliver(msg)
        if isinstance(msg, ConsistencyCheck):
            return self._consistency(msg)
        if isinstance(msg, UnmaskRequest):
            return self._unmask(msg)
        raise SecAggRefused(f"{type(msg).__name__} is not a secure-aggregation message")

    def _start(self, msg: SecAggStart) -> list[Message]:
        if (msg.round, msg.attempt) <= self._last:
            raise SecAggRefused(f"round {msg.round}.{msg.attempt} is not newer than {self._last[0]}.{self._last[1]}")
        if self.site_id not in msg.participants:
            raise SecAggRefused("this site is not among the round's participants")
        try:
            plan = QuantPlan(**msg.quant)
        except TypeError as exc:
            raise SecAggRefused(f"bad quantisation plan: {exc}") from None
        if plan.bits not in (32, 64) or not plan.scale > 0:
            raise SecAggRefused("bad quantisation plan")
        if msg.prg not in PRGS:
            raise SecAggRefused(f"unknown mask PRG {msg.prg!r}; this site knows {', '.join(PRGS)}")
        self._last = (msg.round, msg.attempt)
        c, s = EphemeralKey(self._random(32)), EphemeralKey(self._random(32))
        ctx = round_context(self.run_id, msg.round, msg.attempt)
        self._round = _Round(msg.round, msg.attempt, msg.vector_len, plan, msg.prg, c, s, self._random(32), ctx)
        self._revealed = {}
        self.stage = ClientStage.ADVERTISED
        sig = self.identity.sign(keys_message(self.run_id, msg.round, msg.attempt, self.site_id, c.public, s.public))
        return [AdvertiseKeys(msg.round, msg.attempt, c.public, s.public, sig)]

    def _roster(self, msg: KeyRoster) -> list[Message]:
        self._expect(ClientStage.ADVERTISED)
        r = self._check_round(msg)
        if self.site_id not in msg.advertised:
            raise SecAggRefused("the roster leaves this site out")
        degree = msg.degree or None
        nbrs = neighbours(msg.advertised, degree, graph_seed(self.run_id, r.rnd, r.attempt, msg.advertised))[self.site_id]
        group = [self.site_id, *nbrs]
        majority = len(group) // 2 + 1
        if not majority <= msg.threshold <= len(group):
            raise SecAggRefused(f"threshold {msg.threshold} is not between a majority ({majority}) and {len(group)}")
        entries = {e[0]: e for e in msg.entries}
        if set(entries) != set(nbrs):
            raise SecAggRefused("the roster's keys are not exactly this site's neighbours")
        for v in nbrs:
            _, c_pk, s_pk, sig = entries[v]
            peer = self.peers.get(v)
            if peer is None:
                raise SecAggRefused(f"site {v} has no pinned identity key")
            try:
                peer.verify(keys_message(self.run_id, r.rnd, r.attempt, v, c_pk, s_pk), sig)
            except AuthenticationFailed:
                raise SecAggRefused(f"site {v}'s key advertisement does not verify") from None
            if c_pk in (r.c.public, r.s.public) or s_pk in (r.c.public, r.s.public):
                raise SecAggRefused("a neighbour advertises this site's own key")
            r.peer_keys[v] = (c_pk, s_pk)
        r.threshold, r.group = msg.threshold, group
        b_shares = shamir.split(r.b_seed, len(group), msg.threshold, rng=self._random)
        s_shares = shamir.split(r.s.secret_bytes(), len(group), msg.threshold, rng=self._random)
        out = []
        for i, v in enumerate(group):
            b, s = shamir.encode_share(b_shares[i]), shamir.encode_share(s_shares[i])
            if v == self.site_id:
                r.held[v] = (b, s)
                continue
            plain = msgpack.packb([self.run_id, r.rnd, r.attempt, self.site_id, v, b, s], use_bin_type=True)
            key = share_key(r.c, r.peer_keys[v][0], self.site_id, v, r.ctx)
            out.append([v, StreamCipher(key).seal(0, plain, r.ctx)])
        self.stage = ClientStage.SHARED
        return [ShareKeys(r.rnd, r.attempt, out)]

    def _deliver(self, msg: ShareDelivery) -> list[Message]:
        self._expect(ClientStage.SHARED)
        r = self._check_round(msg)
        for sender, ct in msg.shares:
            if sender not in r.peer_keys:
                raise SecAggRefused(f"a share from site {sender}, which is not a neighbour")
            key = share_key(r.c, r.peer_keys[sender][0], sender, self.site_id, r.ctx)
            try:
                plain = StreamCipher(key).open(0, ct, r.ctx)
                run_id, rnd, attempt, frm, to, b, s = msgpack.unpackb(plain, raw=False)
                expected = [self.run_id, r.rnd, r.attempt, sender, self.site_id]
                if [run_id, rnd, attempt, frm, to] != expected:
                    raise ValueError("wrong context")
                shamir.decode_share(b), shamir.decode_share(s)
            except (AuthenticationFailed, ValueError, TypeError, msgpack.UnpackException):
                raise SecAggRefused(f"the share from site {sender} does not verify") from None
            r.held[sender] = (b, s)
        r.shared_with = sorted(int(sender) for sender, _ in msg.shares)
        if len(r.shared_with) + 1 < r.threshold:
            raise SecAggRefused(f"only {len(r.shared_with)} neighbours shared keys; threshold {r.threshold}")
        self.stage = ClientStage.READY
        return self._maybe_mask()

    def _maybe_mask(self) -> list[Message]:
        r = self._current()
        if self.stage is not ClientStage.READY or r.input is None:
            return []
        delta, n = r.input
        masks = [(1, r.b_seed)] + [
            (sign(self.site_id, v), pair_seed(r.s, r.peer_keys[v][1], self.site_id, v, r.ctx)) for v in r.shared_with
        ]
        if n == -1:  # set_quantized: already a ring vector
            q = add_masks(delta, None, masks, prg=r.prg)
        else:
            n = min(n, r.plan.max_samples)
            try:
                q, self.clipped = quantize(delta, n, r.plan, noise_seed=self._random(32), masks=masks, prg=r.prg)
            except QuantisationError as exc:
                raise SecAggRefused(str(exc)) from None
        r.input = None
        self.stage = ClientStage.MASKED
        return [MaskedInput(r.rnd, r.attempt, {"y": q})]

    def _consistency(self, msg: ConsistencyCheck) -> list[Message]:
        self._expect(ClientStage.MASKED)
        r = self._check_round(msg)
        survivors = sorted(msg.survivors)
        if self.site_id not in survivors:
            raise SecAggRefused("the survivor list leaves this site out")
        if len(survivors) < self.min_survivors:
            raise SecAggRefused(f"{len(survivors)} survivors, fewer than {self.min_survivors}")
        if sum(1 for v in r.group if v in survivors) < r.threshold:
            raise SecAggRefused("fewer survivors in this site's group than the threshold")
        r.survivors = survivors
        self.stage = ClientStage.SIGNED
        sig = self.identity.sign(survivors_message(self.run_id, r.rnd, r.attempt, survivors))
        return [ConsistencySig(r.rnd, r.attempt, sig)]

    def _unmask(self, msg: UnmaskRequest) -> list[Message]:
        self._expect(ClientStage.SIGNED)
        r = self._check_round(msg)
        survivors, dropped = sorted(msg.survivors), sorted(msg.dropped)
        if survivors != r.survivors:
            raise SecAggRefused("the survivor list differs from the one this site signed")
        if set(survivors) & set(dropped):
            raise SecAggRefused("survivor and dropout lists overlap")
        text = survivors_message(self.run_id, r.rnd, r.attempt, survivors)
        valid: set[int] = set()
        for signer, sig in msg.signatures:
            if len(valid) >= r.threshold:
                break  # t valid signatures on this exact list are what the check needs
            peer = self.peers.get(signer) if signer != self.site_id else self.identity.public
            if signer not in survivors or peer is None:
                continue
            try:
                peer.verify(text, sig)
            except AuthenticationFailed:
                raise SecAggRefused(f"site {signer}'s signature on the survivor list does not verify") from None
            valid.add(signer)
        if len(valid) < r.threshold:
            raise SecAggRefused(f"{len(valid)} valid survivor signatures, threshold {r.threshold}")
        b_out, s_out = [], []
        for owner, (b, s) in sorted(r.held.items()):
            if owner in survivors:
                kind, out, share = "b", b_out, b
            elif owner in dropped:
                kind, out, share = "s", s_out, s
            else:
                continue
            if self._revealed.setdefault(owner, kind) != kind:  # the invariant, checked where it matters
                raise SecAggRefused(f"asked for both kinds of share of site {owner}")
            out.append([owner, share])
        self.stage = ClientStage.DONE
        return [UnmaskResponse(r.rnd, r.attempt, b_out, s_out)]
