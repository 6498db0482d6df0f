"""The site's privacy ledger: every DP-SGD round's (noise multiplier, sample rate, steps), with the
epsilon spent computed by Opacus' RDP accountant, persisted atomically in the site's own folder.

A restarted site reloads its history and keeps spending from where it stopped, never from zero.
``would_exceed`` is the budget stop: before training a round, the site asks whether that round
would take it over its target epsilon.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant

from ..fsutil import atomic_write_bytes

__all__ = ["LedgerEntry", "PrivacyLedger"]

MECHANISM = "rdp"


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


class PrivacyLedger:
    def __init__(self, path: Path | None, *, delta: float) -> None:
        self.path = path
        self.delta = delta
        self.entries: list[LedgerEntry] = []
        if path is not None and path.exists():
            self.load_state_dict(json.loads(path.read_text()))

    # -- accounting ------------------------------------------------------------------------------

    @staticmethod
    def _epsilon(entries: list[LedgerEntry], delta: float) -> float:
        if not entries:
            return 0.0
        # RDP composes additively and is linear in the step count, so rounds with the same (sigma, q)
        # are one entry of their summed steps, as Opacus' own accountant keeps repeated steps.  One
        # entry costs about 40 ms to evaluate; per round, the history would grow without bound.
        steps: dict[tuple[float, float], int] = {}
        for e in entries:
            key = (e.noise_multiplier, e.sample_rate)
            steps[key] = steps.get(key, 0) + e.steps
        acc = RDPAccountant()
        acc.history = [(sigma, q, n) for (sigma, q), n in steps.items()]
        return float(acc.get_epsilon(delta))

    def epsilon(self) -> float:
        return self._epsilon(self.entries, self.delta)

    def would_exceed(self, *, noise_multiplier: float, sample_rate: float, steps: int, target_epsilon: float) -> bool:
        """True if one more round like this would spend more than ``target_epsilon``."""
        extra = LedgerEntry(-1, noise_multiplier, sample_rate, steps)
        # get_noise_multiplier solves to within its tolerance (0.01); don't stop a site over that.
        return self._epsilon([*self.entries, extra], self.delta) > target_epsilon * 1.01

    def record(self, rnd: int, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Charge one round's training, on disk before its update can leave the site."""
        self.entries.append(LedgerEntry(rnd, noise_multiplier, sample_rate, steps))
        self.save()
        return self.epsilon()

    def refund(self, rnd: int) -> bool:
        """Give back the charge of the last training, of round ``rnd``, whose update never left
        the site: a mechanism whose output is never released costs nothing.  The site calls this
        only for the training it just finished or held (one trains at a time), so the last entry
        is that training's; anything else is refused (False)."""
        if not self.entries or self.entries[-1].round != rnd:
            return False
        self.entries.pop()
        self.save()
        return True

    # -- persistence -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": MECHANISM, "delta": self.delta, "history": [e.__dict__ for e in self.entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mechanism") != MECHANISM:
            raise ValueError(f"privacy ledger holds a {state.get('mechanism')!r} history, not {MECHANISM!r}")
        if state.get("delta") != self.delta:
            raise ValueError(f"privacy ledger was kept with delta={state.get('delta')}, not {self.delta}")
        self.entries = [LedgerEntry(**e) for e in state["history"]]

    def save(self) -> None:
        if self.path is not None:
            atomic_write_bytes(self.path, (json.dumps(self.state_dict(), indent=1) + "\n").encode())
