"""Every message of the Asagiri wire protocol: one frozen, slotted dataclass each.

Messages are validated when built, so a decoded message that exists is well-formed; the codec
turns a validation failure on received data into ``RemoteProtocolError``.  Tensors travel as
``Params`` (an ordered ``dict[str, numpy.ndarray]``), never pickled.  Don't subclass these.

Over 400 lines on purpose: all 24 messages in one module, in the order of protocol/SPEC.md §2.3,
so the table and the code can be read side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..causes import AbortCause, Rule
from ..params import Params

__all__ = [
    "ALLOWED_DTYPES",
    "ClientAuth",
    "ClientHello",
    "Decline",
    "EvaluateIns",
    "EvaluateRes",
    "FitIns",
    "FitRes",
    "Heartbeat",
    "Message",
    "ModelAt",
    "Reject",
    "RoundAborted",
    "RoundRecord",
    "ServerHello",
    "Shutdown",
    "Welcome",
    "MESSAGE_TYPES",
    "AdvertiseKeys",
    "ConsistencyCheck",
    "ConsistencySig",
    "KeyRoster",
    "MaskedInput",
    "SecAggStart",
    "ShareDelivery",
    "ShareKeys",
    "SumAnnounce",
    "SumProof",
    "SumRecord",
    "SumVouch",
    "UnmaskRequest",
    "UnmaskResponse",
]

PROTOCOL_VERSION = 1


# Little-endian only; the wire names are numpy's ``dtype.str``.
ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8", "|i1", "|u1", "<i4", "<u4", "<i8", "<u8", "|b1"})

_MAX_NAME = 256
_MAX_TEXT = 4096
_MAX_RANK = 8
MAX_SITE_ID = (1 << 31) - 1  # site ids are u31 (SPEC §2)
MAX_ROUND = (1 << 32) - 1  # rounds are u32: the round context packs them so (SPEC §2.3, §6.1)


class MessageError(ValueError):
    """A message failed validation (raised at construction)."""


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise MessageError(what)


def _int(value: Any, name: str, *, lo: int = 0, hi: int = (1 << 63) - 1) -> None:
    _require(type(value) is int and lo <= value <= hi, f"{name} must be an integer in [{lo}, {hi}]")


def _bytes(value: Any, name: str, *, size: int | None = None, max_size: int = 1 << 16) -> None:
    _require(isinstance(value, bytes), f"{name} must be bytes")
    if size is not None:
        _require(len(value) == size, f"{name} must be exactly {size} bytes")
    _require(len(value) <= max_size, f"{name} is longer than {max_size} bytes")


def _text(value: Any, name: str, *, max_len: int = _MAX_TEXT) -> None:
    _require(isinstance(value, str) and len(value) <= max_len, f"{name} must be a string of <= {max_len}")


def _cause(msg: Any, name: str, kind: type[Rule] | type[AbortCause]) -> None:
    """A cause from its closed set, stored as the enum member (it travels as its string value)."""
    value = getattr(msg, name)
    _require(isinstance(value, str) and value in kind._value2member_map_,
             f"{name} must be one of {sorted(kind._value2member_map_)}")
    object.__setattr__(msg, name, kind(value))


def _scalar_map(value: Any, name: str, *, depth: int = 0) -> None:
    """JSON-like maps of scalars (and nested maps/lists), bounded in size and depth."""
    _require(isinstance(value, dict) and len(value) <= 256 and depth <= 4, f"{name} must be a small map")
    for k, v in value.items():
        _require(isinstance(k, str) and len(k) <= _MAX_NAME, f"{name} keys must be short strings")
        _scalar(v, f"{name}.{k}", depth=depth + 1)


def _scalar(v: Any, name: str, *, depth: int) -> None:
    if isinstance(v, dict):
        _scalar_map(v, name, depth=depth)
    elif isinstance(v, list):
        _require(len(v) <= 4096 and depth <= 4, f"{name} list is too long")
        for item in v:
            _scalar(item, name, depth=depth + 1)
    elif isinstance(v, float):
        _require(math.isfinite(v), f"{name} must be finite")
    else:
        _require(v is None or isinstance(v, bool | int | str), f"{name} has an unsupported type")


def _params(value: Any, name: str) -> None:
    _require(isinstance(value, dict) and len(value) <= 4096, f"{name} must be a map of tensors")
    for key, arr in value.items():
        _require(isinstance(key, str) and 0 < len(key) <= _MAX_NAME, f"{name} tensor names must be short strings")
        _require(isinstance(arr, np.ndarray), f"{name}[{key}] must be a numpy array")
        _require(arr.dtype.str in ALLOWED_DTYPES, f"{name}[{key}] has unsupported dtype {arr.dtype.str}")
        _require(arr.ndim <= _MAX_RANK, f"{name}[{key}] has rank above {_MAX_RANK}")


def _metrics(value: Any, name: str) -> None:
    _require(isinstance(value, dict) and len(value) <= 64, f"{name} must be a small map")
    for k, v in value.items():
        _require(isinstance(k, str) and len(k) <= _MAX_NAME, f"{name} keys must be short strings")
        _require(isinstance(v, float | int) and not isinstance(v, bool), f"{name}.{k} must be a number")
        _require(math.isfinite(v), f"{name}.{k} must be finite")


def _ring_vector(value: Any, name: str, tensor: str) -> None:
    """Exactly one tensor, ``tensor``: a 1-d vector of ring words (uint32 or uint64)."""
    _params(value, name)
    _require(set(value) == {tensor}, f"{name} holds exactly one tensor, {tensor!r}")
    v = value[tensor]
    _require(v.ndim == 1 and v.dtype.str in ("<u4", "<u8"), f"{name} {tensor} is a 1-d uint32 or uint64 array")


def _scalars(value: Any, name: str) -> None:
    """A vouch's masked scalars: three words of twice the ring's width (SPEC §6.8)."""
    _require(isinstance(value, bytes) and len(value) in (24, 48), f"{name} must be 24 or 48 bytes")


def _vouches(value: Any, name: str) -> None:
    """Signed vouches, ``[site_id, scalars, signature]`` with distinct ids (SPEC §6.8)."""
    _require(isinstance(value, list) and len(value) <= 1 << 16, f"{name} must be a list")
    seen = set()
    for item in value:
        _require(isinstance(item, list | tuple) and len(item) == 3, f"{name} are [id, scalars, signature]")
        _int(item[0], f"{name}[].id", hi=MAX_SITE_ID)
        _scalars(item[1], f"{name}[].scalars")
        _bytes(item[2], f"{name}[].signature", size=64)
        _require(item[0] not in seen, f"{name} repeat id {item[0]}")
        seen.add(item[0])


def _ids(value: Any, name: str) -> None:
    _require(isinstance(value, list) and len(value) <= 1 << 16, f"{name} must be a list of site ids")
    for v in value:
        _int(v, f"{name}[]", hi=MAX_SITE_ID)
    _require(len(set(value)) == len(value), f"{name} has duplicates")


def _id_bytes(value: Any, name: str, *, size: int | None = None, max_size: int = 1 << 12) -> None:
    """A list of ``[site_id, bytes]`` pairs with distinct ids."""
    _require(isinstance(value, list) and len(value) <= 1 << 16, f"{name} must be a list of [id, bytes]")
    seen = set()
    for item in value:
        _require(isinstance(item, list | tuple) and len(item) == 2, f"{name} items are [id, bytes]")
        _int(item[0], f"{name}[].id", hi=MAX_SITE_ID)
        _bytes(item[1], f"{name}[].bytes", size=size, max_size=max_size)
        _require(item[0] not in seen, f"{name} repeats id {item[0]}")
        seen.add(item[0])


class Message:
    """Base of all messages. ``TAG`` is the wire type; ``TENSOR_FIELDS`` carry ``Params``."""

    __slots__ = ()
    TAG: ClassVar[int]
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def __post_init__(self) -> None:
        self.validate()


# ---- handshake (plaintext frames) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientHello(Message):
    TAG: ClassVar[int] = 1
    version: int
    site_id: int
    ephemeral_key: bytes
    nonce: bytes

    def validate(self) -> None:
        _int(self.version, "version", hi=65535)
        _int(self.site_id, "site_id", hi=MAX_SITE_ID)
        _bytes(self.ephemeral_key, "ephemeral_key", size=32)
        _bytes(self.nonce, "nonce", size=16)


@dataclass(frozen=True, slots=True)
class ServerHello(Message):
    TAG: ClassVar[int] = 2
    version: int
    ephemeral_key: bytes
    signature: bytes

    def validate(self) -> None:
        _int(self.version, "version", hi=65535)
        _bytes(self.ephemeral_key, "ephemeral_key", size=32)
        _bytes(self.signature, "signature", size=64)


@dataclass(frozen=True, slots=True)
class ClientAuth(Message):
    TAG: ClassVar[int] = 3
    signature: bytes

    def validate(self) -> None:
        _bytes(self.signature, "signature", size=64)


@dataclass(frozen=True, slots=True)
class Reject(Message):
    """Sent in the clear when the coordinator refuses a site; the connection closes after it."""

    TAG: ClassVar[int] = 4
    reason: str

    def validate(self) -> None:
        _text(self.reason, "reason")


# ---- session (encrypted frames) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """First encrypted message: the run this site joined and the training spec it must follow."""

    TAG: ClassVar[int] = 10
    run_id: str
    site_index: int
    num_sites: int
    spec: dict[str, Any]

    def validate(self) -> None:
        _text(self.run_id, "run_id", max_len=128)
        _int(self.num_sites, "num_sites", lo=1, hi=1 << 20)
        _int(self.site_index, "site_index", hi=self.num_sites - 1)
        _scalar_map(self.spec, "spec")


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    TAG: ClassVar[int] = 11
    seq: int

    def validate(self) -> None:
        _int(self.seq, "seq")


@dataclass(frozen=True, slots=True)
class FitIns(Message):
    """Train on the global ``params`` (the shared parameters only) for round ``round``."""

    TAG: ClassVar[int] = 20
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("params",)
    round: int
    attempt: int
    params: Params = field(repr=False)
    config: dict[str, Any]

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _params(self.params, "params")
        _scalar_map(self.config, "config")


@dataclass(frozen=True, slots=True)
class FitRes(Message):
    """A site's sum-ready update: ``num_samples * (local - global)`` for each shared tensor."""

    TAG: ClassVar[int] = 21
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("update",)
    round: int
    attempt: int
    update: Params = field(repr=False)
    num_samples: int
    metrics: dict[str, float]

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _params(self.update, "update")
        _int(self.num_samples, "num_samples", lo=1, hi=1 << 40)
        _metrics(self.metrics, "metrics")


@dataclass(frozen=True, slots=True)
class Decline(Message):
    """A site will not take part in this round attempt: ``rule`` names the check that refused it
    (or ``privacy_budget``), never a detail, which could describe the site's data."""

    TAG: ClassVar[int] = 22
    round: int
    attempt: int
    rule: Rule
    permanent: bool

    def validate(self) -> None:
        _int(self.round, "round", lo=0 if self.attempt == 0 else 1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", hi=1 << 16)  # 0: it declines an EvaluateIns (SPEC §6.9)
        _cause(self, "rule", Rule)
        _require(isinstance(self.permanent, bool), "permanent must be a bool")


@dataclass(frozen=True, slots=True)
class EvaluateIns(Message):
    TAG: ClassVar[int] = 30
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("params",)
    round: int
    params: Params = field(repr=False)
    split: str

    def validate(self) -> None:
        _int(self.round, "round", hi=MAX_ROUND)
        _params(self.params, "params")
        _require(self.split in ("val", "test"), "split must be 'val' or 'test'")


@dataclass(frozen=True, slots=True)
class EvaluateRes(Message):
    """Metrics of the global model on a site's split.

    ``predictions`` is empty for validation. For the official test split it carries ``scores``
    (N x outputs) and ``labels`` (N, or N x labels), which the coordinator pools into one score:
    the test split is public benchmark data, not a site's patients.
    """

    TAG: ClassVar[int] = 31
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("predictions",)
    round: int
    split: str
    num_examples: int
    metrics: dict[str, float]
    predictions: Params = field(default_factory=dict, repr=False)

    def validate(self) -> None:
        _int(self.round, "round", hi=MAX_ROUND)
        _require(self.split in ("val", "test"), "split must be 'val' or 'test'")
        _int(self.num_examples, "num_examples", hi=1 << 40)
        _metrics(self.metrics, "metrics")
        _params(self.predictions, "predictions")
        if self.predictions:
            _require(set(self.predictions) == {"scores", "labels"}, "predictions are exactly scores and labels")
            sc, lab = self.predictions["scores"], self.predictions["labels"]
            _require(sc.ndim == 2 and len(sc) == len(lab) == self.num_examples, "predictions do not match num_examples")


MAX_RECORD_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class RoundRecord(Message):
    """The coordinator's signed audit record of a completed round (protocol/SPEC.md §9): one line
    of its ``audit.jsonl``, byte for byte, which the site checks against what it saw and keeps."""

    TAG: ClassVar[int] = 32
    round: int
    record: bytes = field(repr=False)

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _bytes(self.record, "record", max_size=MAX_RECORD_BYTES)


@dataclass(frozen=True, slots=True)
class RoundAborted(Message):
    """The round attempt ended without an aggregate: ``cause`` from a closed set, ``detail`` for people."""

    TAG: ClassVar[int] = 40
    round: int
    attempt: int
    cause: AbortCause
    detail: str

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _cause(self, "cause", AbortCause)
        _text(self.detail, "detail")


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    """The federation is over (or the coordinator is stopping); the site may exit."""

    TAG: ClassVar[int] = 41
    reason: str
    final: bool

    def validate(self) -> None:
        _text(self.reason, "reason")
        _require(isinstance(self.final, bool), "final must be a bool")


# ---- secure aggregation (encrypted frames; see asagiri/secagg) ---------------------------------


@dataclass(frozen=True, slots=True)
class SecAggStart(Message):
    """Begin key set-up for the round whose ``FitIns`` came just before; runs while the sites train.

    Every field, with the FitIns parameters and config and the Welcome spec, goes into the round
    digest the sites sign (protocol/SPEC.md §6), and each site recomputes ``quant``, ``degree``
    and ``threshold`` from the spec itself.
    """

    TAG: ClassVar[int] = 50
    round: int
    attempt: int
    participants: list[int]
    vector_len: int
    quant: dict[str, Any]
    prg: str  # the mask PRG: "aes128-ctr" or "chacha20" (protocol/SPEC.md §6)
    degree: int  # neighbours per site; 0: the complete graph
    threshold: int  # Shamir threshold t

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _ids(self.participants, "participants")
        _int(self.vector_len, "vector_len", lo=1, hi=1 << 34)
        _scalar_map(self.quant, "quant")
        if not isinstance(self.prg, str) or len(self.prg) > 32:
            raise MessageError("prg must be a short string")
        _int(self.degree, "degree", hi=1 << 16)
        _int(self.threshold, "threshold", lo=1, hi=1 << 16)


@dataclass(frozen=True, slots=True)
class AdvertiseKeys(Message):
    """Two fresh X25519 public keys (share encryption, masking), signed with the identity key."""

    TAG: ClassVar[int] = 51
    round: int
    attempt: int
    c_pk: bytes
    s_pk: bytes
    signature: bytes

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _bytes(self.c_pk, "c_pk", size=32)
        _bytes(self.s_pk, "s_pk", size=32)
        _bytes(self.signature, "signature", size=64)


@dataclass(frozen=True, slots=True)
class KeyRoster(Message):
    """Who advertised (U1), and the signed keys of this site's neighbours in the graph over U1."""

    TAG: ClassVar[int] = 52
    round: int
    attempt: int
    advertised: list[int]
    entries: list[list[Any]]  # [site_id, c_pk, s_pk, signature]

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _ids(self.advertised, "advertised")
        _require(isinstance(self.entries, list) and len(self.entries) <= 1 << 16, "entries must be a list")
        seen = set()
        for e in self.entries:
            _require(isinstance(e, list | tuple) and len(e) == 4, "entries are [id, c_pk, s_pk, signature]")
            _int(e[0], "entries[].id", hi=MAX_SITE_ID)
            _bytes(e[1], "entries[].c_pk", size=32)
            _bytes(e[2], "entries[].s_pk", size=32)
            _bytes(e[3], "entries[].signature", size=64)
            _require(e[0] not in seen, f"entries repeat id {e[0]}")
            seen.add(e[0])


@dataclass(frozen=True, slots=True)
class ShareKeys(Message):
    """Encrypted Shamir shares of b_u and s_sk_u, one ciphertext per neighbour (coordinator routes)."""

    TAG: ClassVar[int] = 53
    round: int
    attempt: int
    shares: list[list[Any]]  # [recipient_id, ciphertext]

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _id_bytes(self.shares, "shares")


@dataclass(frozen=True, slots=True)
class ShareDelivery(Message):
    TAG: ClassVar[int] = 54
    round: int
    attempt: int
    shares: list[list[Any]]  # [sender_id, ciphertext]

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _id_bytes(self.shares, "shares")


@dataclass(frozen=True, slots=True)
class MaskedInput(Message):
    """The quantised, weighted update plus sample count, masked: uniform-looking ring elements."""

    TAG: ClassVar[int] = 55
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("vector",)
    round: int
    attempt: int
    vector: Params = field(repr=False)

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _ring_vector(self.vector, "vector", "y")


@dataclass(frozen=True, slots=True)
class ConsistencyCheck(Message):
    TAG: ClassVar[int] = 56
    round: int
    attempt: int
    survivors: list[int]

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _ids(self.survivors, "survivors")


@dataclass(frozen=True, slots=True)
class ConsistencySig(Message):
    """The survivor list signed, together with the neighbours this site masked with."""

    TAG: ClassVar[int] = 57
    round: int
    attempt: int
    masked_with: list[int]
    signature: bytes

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _ids(self.masked_with, "masked_with")
        _bytes(self.signature, "signature", size=64)


@dataclass(frozen=True, slots=True)
class UnmaskRequest(Message):
    TAG: ClassVar[int] = 58
    round: int
    attempt: int
    survivors: list[int]
    dropped: list[int]
    signatures: list[list[Any]]  # [site_id, masked_with [id], signature over the survivor list]

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _ids(self.survivors, "survivors")
        _ids(self.dropped, "dropped")
        _require(isinstance(self.signatures, list) and len(self.signatures) <= 1 << 16, "signatures must be a list")
        seen = set()
        for item in self.signatures:
            _require(isinstance(item, list | tuple) and len(item) == 3, "signatures are [id, masked_with, signature]")
            _int(item[0], "signatures[].id", hi=MAX_SITE_ID)
            _ids(item[1], "signatures[].masked_with")
            _bytes(item[2], "signatures[].signature", size=64)
            _require(item[0] not in seen, f"signatures repeat id {item[0]}")
            seen.add(item[0])


@dataclass(frozen=True, slots=True)
class UnmaskResponse(Message):
    """For each neighbour: its b share if it survived, its masking-key share if it dropped. Never both."""

    TAG: ClassVar[int] = 59
    round: int
    attempt: int
    b_shares: list[list[Any]]  # [owner_id, share]
    s_shares: list[list[Any]]

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _id_bytes(self.b_shares, "b_shares", size=68)
        _id_bytes(self.s_shares, "s_shares", size=68)
        owners_b = {o for o, _ in self.b_shares}
        _require(not owners_b & {o for o, _ in self.s_shares}, "a peer appears in both share lists")


@dataclass(frozen=True, slots=True)
class SumAnnounce(Message):
    """The unmasked sum, sent to each certified survivor for it to vouch for (SPEC §6.8)."""

    TAG: ClassVar[int] = 60
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("total",)
    round: int
    attempt: int
    total: Params = field(repr=False)

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _ring_vector(self.total, "total", "s")


@dataclass(frozen=True, slots=True)
class SumVouch(Message):
    """A survivor's masked projections of its own input under the sum's challenge, signed."""

    TAG: ClassVar[int] = 61
    round: int
    attempt: int
    scalars: bytes
    signature: bytes

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _scalars(self.scalars, "scalars")
        _bytes(self.signature, "signature", size=64)


@dataclass(frozen=True, slots=True)
class SumProof(Message):
    """Every survivor's signed vouch, relayed to each of them: the sum checks out or it does not."""

    TAG: ClassVar[int] = 62
    round: int
    attempt: int
    vouches: list[list[Any]]  # [site_id, scalars, signature]

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _vouches(self.vouches, "vouches")


@dataclass(frozen=True, slots=True)
class SumRecord(Message):
    """A verified round's sum with everything a site that was not among its survivors needs to
    check it from the pinned keys alone and take the step to the next model (SPEC §6.9): the
    round's participants and fit config (so ``ctx``), its survivors, the sum, and every vouch."""

    TAG: ClassVar[int] = 63
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("total",)
    round: int
    attempt: int
    participants: list[int]
    config: dict[str, Any]
    survivors: list[int]
    total: Params = field(repr=False)
    vouches: list[list[Any]]  # [site_id, scalars, signature]

    def validate(self) -> None:
        _int(self.round, "round", lo=1, hi=MAX_ROUND)
        _int(self.attempt, "attempt", lo=1, hi=1 << 16)
        _ids(self.participants, "participants")
        _scalar_map(self.config, "config")
        _ids(self.survivors, "survivors")
        _ring_vector(self.total, "total", "s")
        _vouches(self.vouches, "vouches")


@dataclass(frozen=True, slots=True)
class ModelAt(Message):
    """The site's own place on the run's model trajectory (SPEC §6.9): the last round whose sum it
    applied (0: none, the model is ``W_0``) and its model's digest.  The coordinator answers with
    the ``SumRecord`` of every later round."""

    TAG: ClassVar[int] = 64
    round: int
    digest: bytes

    def validate(self) -> None:
        _int(self.round, "round", hi=MAX_ROUND)
        _bytes(self.digest, "digest", size=32)


MESSAGE_TYPES: dict[int, type[Message]] = {}


def register(cls: type[Message]) -> type[Message]:
    if cls.TAG in MESSAGE_TYPES:
        raise RuntimeError(f"duplicate message tag {cls.TAG}")
    MESSAGE_TYPES[cls.TAG] = cls
    return cls


for _cls in (
    ClientHello,
    ServerHello,
    ClientAuth,
    Reject,
    Welcome,
    Heartbeat,
    FitIns,
    FitRes,
    Decline,
    EvaluateIns,
    EvaluateRes,
    RoundRecord,
    RoundAborted,
    Shutdown,
    SecAggStart,
    AdvertiseKeys,
    KeyRoster,
    ShareKeys,
    ShareDelivery,
    MaskedInput,
    ConsistencyCheck,
    ConsistencySig,
    UnmaskRequest,
    UnmaskResponse,
    SumAnnounce,
    SumVouch,
    SumProof,
    SumRecord,
    ModelAt,
):
    register(_cls)
