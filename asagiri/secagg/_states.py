"""The secure-aggregation state machines' stages and transitions, as data.

Rule 1 (as in h11's ``_state.py``): every stage change of ``server.py``'s and ``client.py``'s
machines is an entry of a table here, ``{(stage, event type): next stage}``; the machines look
their table up and raise their violation (``ProtocolViolation``) or refusal (rule ``stage``) for an
event the table does not list in the current stage.  Rule 2: this file knows no keys, shares or
sums; the handlers in ``server.py`` and ``client.py`` check those before a transition is taken.

protocol/SPEC.md §6.6 and §7 show these tables as diagrams drawn from them
(``python -m protocol.tools.state_diagrams``); a test fails when the drawings are stale.

Theory of operation (what does not fit in a table):

- An event type is a message class (exactly ``type(msg)``: messages are never subclassed) or one
  of the classes below, which a machine fires on itself when a stage closes or a check fails.
- The coordinator's machine takes ``site_lost`` and ``stage_timed_out`` in any stage: they change
  no stage themselves, but may close the current one (``StageClosed`` / ``StageFailed``).  Late
  words from a dropped site, and messages of an earlier round attempt, are ignored before the
  table is consulted.
- The site's ``LocalUpdate`` may come in any stage of a round: outside ``READY`` the update waits,
  and it is masked when ``ShareDelivery`` makes the site ``READY``.
"""

from __future__ import annotations

import enum

from ..wire.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySig,
    FitIns,
    KeyRoster,
    MaskedInput,
    SecAggStart,
    ShareDelivery,
    ShareKeys,
    SumAnnounce,
    SumProof,
    SumVouch,
    UnmaskRequest,
    UnmaskResponse,
)

__all__ = [
    "CLIENT_ACCEPTS",
    "CLIENT_MESSAGES",
    "CLIENT_TRANSITIONS",
    "SERVER_ACCEPTS",
    "SERVER_TRANSITIONS",
    "ClientStage",
    "LocalUpdate",
    "Refused",
    "ServerStage",
    "StageClosed",
    "StageFailed",
]


class ServerStage(enum.Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    VERIFY = "verify"
    DONE = "done"
    ABORTED = "aborted"


class ClientStage(enum.Enum):
    IDLE = "idle"
    ADVERTISED = "advertised"
    SHARED = "shared"
    READY = "ready"
    MASKED = "masked"
    SIGNED = "signed"
    UNMASKED = "unmasked"
    VOUCHED = "vouched"
    VERIFIED = "verified"
    ABORTED = "aborted"


# -- the events a machine fires on itself ----------------------------------------------------------


class StageClosed:
    """Every site the stage waited for answered, was lost, or timed out, and enough of them
    answered: the next stage begins (after UNMASK: the sum is unmasked and announced; after
    VERIFY: every survivor vouched for it, and the vouches go to each of them)."""


class StageFailed:
    """The stage closed with too few sites (below ``min_clients``, the group threshold or the
    signature quorum), the shares rebuilt no consistent secret, or a survivor did not vouch for
    the sum (or the vouches do not add up to it): no sum comes out of the round."""


class LocalUpdate:
    """The site's own update arrived (``set_input`` or ``set_quantized``); masked once ``READY``."""


class Refused:
    """A check failed (``SitePolicy.refuse``): the site says nothing more in this round attempt."""


# -- the coordinator (server.py) ---------------------------------------------------------------------

_S = ServerStage

SERVER_TRANSITIONS: dict[tuple[ServerStage, type], ServerStage] = {
    (_S.ADVERTISE, AdvertiseKeys): _S.ADVERTISE,
    (_S.ADVERTISE, StageClosed): _S.SHARE,
    (_S.ADVERTISE, StageFailed): _S.ABORTED,
    (_S.SHARE, ShareKeys): _S.SHARE,
    (_S.SHARE, StageClosed): _S.MASKED_INPUT,
    (_S.SHARE, StageFailed): _S.ABORTED,
    (_S.MASKED_INPUT, MaskedInput): _S.MASKED_INPUT,
    (_S.MASKED_INPUT, StageClosed): _S.CONSISTENCY,
    (_S.MASKED_INPUT, StageFailed): _S.ABORTED,
    (_S.CONSISTENCY, ConsistencySig): _S.CONSISTENCY,
    (_S.CONSISTENCY, StageClosed): _S.UNMASK,
    (_S.CONSISTENCY, StageFailed): _S.ABORTED,
    (_S.UNMASK, UnmaskResponse): _S.UNMASK,
    (_S.UNMASK, StageClosed): _S.VERIFY,
    (_S.UNMASK, StageFailed): _S.ABORTED,
    (_S.VERIFY, SumVouch): _S.VERIFY,
    (_S.VERIFY, StageClosed): _S.DONE,
    (_S.VERIFY, StageFailed): _S.ABORTED,
}

# -- the site (client.py) ----------------------------------------------------------------------------

_C = ClientStage

CLIENT_TRANSITIONS: dict[tuple[ClientStage, type], ClientStage] = {
    # A FitIns is taken in any stage and moves none: it only says what the next round binds.
    **{(stage, FitIns): stage for stage in ClientStage},
    # A SecAggStart may open a new round attempt from any stage; the replay guard refuses old ones.
    **{(stage, SecAggStart): _C.ADVERTISED for stage in ClientStage},
    (_C.ADVERTISED, KeyRoster): _C.SHARED,
    (_C.SHARED, ShareDelivery): _C.READY,
    (_C.READY, LocalUpdate): _C.MASKED,
    (_C.MASKED, ConsistencyCheck): _C.SIGNED,
    (_C.SIGNED, UnmaskRequest): _C.UNMASKED,  # one unmask per round attempt
    (_C.UNMASKED, SumAnnounce): _C.VOUCHED,  # one vouch per round attempt
    (_C.VOUCHED, SumProof): _C.VERIFIED,
    **{(stage, Refused): _C.ABORTED for stage in ClientStage},
}


def _accepts(table: dict, stages: type[enum.Enum]) -> dict:
    """For each stage, the message types the table takes in it (the machine's own events left out)."""
    return {stage: frozenset(e for (s, e) in table if s is stage and e not in _OWN_EVENTS) for stage in stages}


_OWN_EVENTS = frozenset({StageClosed, StageFailed, LocalUpdate, Refused})

SERVER_ACCEPTS: dict[ServerStage, frozenset[type]] = _accepts(SERVER_TRANSITIONS, ServerStage)
CLIENT_ACCEPTS: dict[ClientStage, frozenset[type]] = _accepts(CLIENT_TRANSITIONS, ClientStage)
# Every message the site's machine knows in some stage: any other is "not a secure-aggregation message".
CLIENT_MESSAGES: frozenset[type] = frozenset().union(*CLIENT_ACCEPTS.values())
