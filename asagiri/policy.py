"""The site's policy: what it will take part in, and the one place every refusal goes through.

The coordinator proposes (``Welcome``, ``FitIns``, ``SecAggStart`` ...); the site decides.  Every
check a site makes on what the coordinator sends ends in :meth:`SitePolicy.refuse`, which names
the rule, logs it, counts it, and raises :class:`Refusal`.  The runtime answers a refusal with a
``Decline`` (permanent when the whole run is unacceptable), so the rest of the federation goes on
and nothing more leaves the site for that round.

Rules (:class:`~asagiri.causes.Rule`; ``docs/secagg.md``, "Site policy"), named after the
``policy:`` keys where there is one:

- ``run_id``, ``require_secagg``, ``pinned_peers``, ``require_dp``, ``max_epsilon``, ``max_delta``:
  the run as a whole (checked on ``Welcome``);
- ``min_participants``, ``min_group``, ``min_threshold``: the size of what is summed and shared
  (``colluders`` raises each);
- ``round_params``: a plan, graph, threshold, PRG or vector length other than the one the site
  derives itself from the spec it signed over;
- ``replay``: a round that is not newer than the last one this site entered, across restarts;
- ``quorum``, ``component``: the survivor list is certified, and this site's input is summed
  with enough others';
- ``spec``, ``stage``, ``signature``, ``shares``, ``survivors``, ``malformed``: protocol checks of
  the secure-aggregation state machine (``secagg/client.py``);
- ``record``: the coordinator's signed record of a round contradicts what this site saw, or never
  came (``site/receipts.py``);
- ``setup``: the run's spec is well formed but cannot be set up at this site (its data, its model).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any, NoReturn

from pydantic import ValidationError

from .causes import Rule
from .config import PolicyConfig, RunSpec
from .errors import Refusal
from .secagg.rules import quorum
from .wire.crypto import PublicIdentity

__all__ = ["Refusal", "SitePolicy"]

log = logging.getLogger(__name__)


class SitePolicy:
    """A site's policy (``policy:`` in site.yaml) and its pinned peers, applied to what arrives."""

    def __init__(self, cfg: PolicyConfig, peers: Mapping[int, PublicIdentity] | None = None) -> None:
        self.cfg = cfg
        self.peers: dict[int, PublicIdentity] = dict(peers or {})
        self.refusals: Counter[Rule] = Counter()

    # -- the one exit ----------------------------------------------------------------------------

    def refuse(self, rule: Rule | str, detail: str) -> NoReturn:
        refusal = Refusal(rule, detail)  # an unknown rule is a bug here, not a new cause on the wire
        self.refusals[refusal.rule] += 1
        log.warning("refused (%s): %s", refusal.rule, detail)
        raise refusal

    def require(self, ok: bool, rule: Rule | str, detail: str) -> None:
        if not ok:
            self.refuse(rule, detail)

    # -- the run ---------------------------------------------------------------------------------

    def check_run(self, run_id: str, spec: Mapping[str, Any]) -> RunSpec:
        """Validate Welcome's spec whole, then hold it against the policy. Returns it typed."""
        try:
            parsed = RunSpec.model_validate(spec)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            self.refuse("spec", f"the run's spec is malformed at {where}: {first['msg']}")
        p = self.cfg
        if p.run_id is not None:
            self.require(run_id == p.run_id, "run_id", f"run {run_id!r} is not the run {p.run_id!r} this site joins")
        if parsed.secagg.enabled:
            self.require(bool(self.peers), "pinned_peers",
                         "the run uses secure aggregation but this site pins no peer keys (`peers` in site.yaml)")
        else:
            self.require(not p.require_secagg, "require_secagg",
                         "the run has secure aggregation off; this site sends no update in the clear")
        dp = parsed.dp
        if not dp.enabled:
            self.require(not p.require_dp, "require_dp", "the run has DP-SGD off; this site trains only under DP")
        else:
            self.require(dp.target_epsilon <= p.max_epsilon, "max_epsilon",
                         f"the run asks for epsilon {dp.target_epsilon:g}, above this site's {p.max_epsilon:g}")
            self.require(dp.target_delta <= p.max_delta, "max_delta",
                         f"the run asks for delta {dp.target_delta:g}, above this site's {p.max_delta:g}")
        return parsed

    # -- one round -------------------------------------------------------------------------------

    def check_participants(self, what: str, ids: list[int] | tuple[int, ...]) -> None:
        self.require(len(ids) >= self.cfg.min_participants, "min_participants",
                     f"{len(ids)} {what}, fewer than this site's {self.cfg.min_participants}")

    def check_examples(self, examples: int) -> None:
        """An update from fewer examples than the floor is too close to the examples themselves."""
        self.require(examples >= self.cfg.min_examples, Rule.MIN_EXAMPLES,
                     f"{examples} training examples, fewer than this site's min_examples={self.cfg.min_examples}")

    def check_pinned(self, ids: list[int] | tuple[int, ...]) -> None:
        unknown = sorted(set(ids) - set(self.peers))
        self.require(not unknown, "pinned_peers", f"sites {unknown} have no pinned identity key here")

    def quorum(self, participants: int) -> int:
        """Survivor-list signatures this site needs (``secagg.rules.quorum`` with its colluders)."""
        return quorum(participants, self.cfg.colluders)

    def check_component(self, ok: bool, detail: str) -> None:
        """Any unmaskable sum holding this site's input holds its whole masking component; the
        secure-aggregation machine works the component out (``secagg.component.component_survives``)."""
        self.require(ok, "component", detail)

    def check_group(self, size: int, threshold: int) -> None:
        self.require(size >= self.cfg.min_group, "min_group",
                     f"a sharing group of {size}, smaller than this site's {self.cfg.min_group}")
        majority = size // 2 + 1
        floor = max(self.cfg.min_threshold, majority, self.cfg.colluders + 1)
        self.require(floor <= threshold <= size, "min_threshold",
                     f"threshold {threshold} for a group of {size}; this site needs {floor}..{size}")
