"""What happens in a federation, as typed records: the federation driver emits them, a recorder
(``recorder.py``) and anything else that watches a run (tests, the attack harness, a report)
consumes them.  Plain frozen dataclasses with no behaviour; nothing here sees a site's update.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import IO, Any

from ..causes import AbortCause, Rule
from ..params import Params

__all__ = [
    "Event",
    "FederationEnded",
    "RoundAborted",
    "RoundCompleted",
    "RoundStarted",
    "RunStarted",
    "SiteDropped",
    "SiteJoined",
    "SiteRefused",
    "StageStarted",
    "StatusLines",
    "TestScored",
    "UpdateReceived",
    "as_record",
]


@dataclass(frozen=True)
class RunStarted:
    """The driver starts its rounds at ``first_round``; ``resumed`` when a checkpoint said where."""

    first_round: int
    resumed: bool
    model_sha256: str
    # What the sites sign and derive from: Welcome's spec, and each enrolled site's identity key
    # (hex), kept beside the log as spec.json so the model history can be replayed (SPEC §6.9).
    spec: dict = field(default_factory=dict)
    sites: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SiteJoined:
    """A site proved its enrolled identity and was welcomed."""

    site: int
    fingerprint: str


@dataclass(frozen=True)
class RoundStarted:
    round: int
    attempt: int
    selected: list[int]
    secure: bool


@dataclass(frozen=True)
class StageStarted:
    """The round moved to ``stage``: ``fit``, a secure-aggregation stage (``fit/advertise``...) or ``evaluate``."""

    round: int
    attempt: int
    stage: str


@dataclass(frozen=True)
class UpdateReceived:
    """A site's contribution arrived: its plaintext update, or its masked input under secure
    aggregation (which says nothing about the update)."""

    round: int
    attempt: int
    site: int


@dataclass(frozen=True)
class SiteDropped:
    """A site left the round: disconnected, silent past its deadline, or closed for a violation,
    at ``stage`` (fit, evaluate, or a secure-aggregation stage: ``fit/advertise_keys``...)."""

    round: int
    attempt: int
    site: int
    reason: str
    stage: str


@dataclass(frozen=True)
class SiteRefused:
    """A site declined, naming the rule that refused (``privacy_budget`` when its budget is spent)."""

    round: int
    attempt: int
    site: int
    rule: Rule
    permanent: bool


@dataclass(frozen=True)
class RoundAborted:
    round: int
    attempt: int
    cause: AbortCause
    reason: str  # the detail, for people
    selected: list[int]
    participants: list[int]
    dropped: list[int]


@dataclass(frozen=True)
class RoundCompleted:
    """A round aggregated. ``record`` is its line of ``metrics.jsonl``; ``params`` the new global
    model and ``velocity`` the server momentum, with ``state``, what a checkpoint must hold."""

    record: dict[str, Any]
    params: Params = field(repr=False)
    velocity: Params | None = field(repr=False)
    state: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class TestScored:
    """The final model on the official test split, predictions pooled over the sites."""

    round: int
    scores: dict[str, Any]


@dataclass(frozen=True)
class FederationEnded:
    """``status``: completed, failed, budget_exhausted or refused_by_sites; ``message`` says why
    it ended early, for a person."""

    status: str
    summary: dict[str, Any]
    message: str = ""


Event = (RunStarted | SiteJoined | RoundStarted | StageStarted | UpdateReceived | SiteDropped | SiteRefused | RoundAborted
         | RoundCompleted | TestScored | FederationEnded)


def as_record(event: Event) -> dict[str, Any]:
    """The event as a JSON-ready record, ``{"event": its type, ...its fields}``: the model and the
    server state are left out (they are in the checkpoint)."""
    out: dict[str, Any] = {"event": type(event).__name__}
    for f in fields(event):
        if f.name not in ("params", "velocity", "state"):
            out[f.name] = getattr(event, f.name)
    return out


class StatusLines:
    """Writes each event as one JSON line to ``stream`` (a coordinator's ``--status-fd``)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self.stream.flush()

    def __call__(self, event: Event) -> None:
        self.write(as_record(event))
