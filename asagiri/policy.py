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
- ``model``, ``train_bounds``, ``secagg_bounds``, ``dp_bounds``: the run's training settings
  against the site's ``policy.bounds`` (checked on ``Welcome``, after the spec validates);
- ``spec_changed``: a Welcome whose spec (or site layout) differs from the one this site joined
  the same ``run_id`` with, across restarts (:class:`JoinedRuns`);
- ``min_participants``, ``min_group``, ``min_threshold``: the size of what is summed and shared
  (``colluders`` raises each);
- ``batches``: the run's participation batches (``require_batches``), and every sum made of
  whole batches (checked on ``Welcome`` and at each secure-aggregation stage);
- ``round_params``: a plan, graph, threshold, PRG or vector length other than the one the site
  derives itself from the spec it signed over;
- ``replay``: a round that is not newer than the last one this site entered, across restarts;
- ``quorum``, ``component``: the survivor list is certified, and this site's input is summed
  with enough others';
- ``spec``, ``stage``, ``signature``, ``shares``, ``survivors``, ``malformed``: protocol checks of
  the secure-aggregation state machine (``secagg/client.py``);
- ``derive_models``: a ``FitIns`` or ``EvaluateIns`` whose weights are not the model this site
  derived itself from the run and the sums it verified (``site/trajectory.py``);
- ``record``: the coordinator's signed record of a round contradicts what this site saw, or never
  came (``site/receipts.py``);
- ``setup``: the run's spec is well formed but cannot be set up at this site (its data, its model).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from pydantic import ValidationError

from .causes import Rule
from .config import PolicyConfig, RunSpec
from .config.federation import ADAPTIVE_STRATEGIES, UNAUGMENTABLE
from .errors import Refusal
from .secagg.binding import spec_digest
from .secagg.rules import batch_map, complete_batches, is_union_of_batches, quorum
from .wire.crypto import PublicIdentity

__all__ = ["JoinedRun", "JoinedRuns", "Refusal", "SitePolicy", "coarse"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinedRun:
    """What a site joined a run with: the digest of its Welcome spec (``secagg.binding.spec_digest``,
    hex) and, where the caller passed them, the site's place in it."""

    spec: str
    num_sites: int | None = None
    site_index: int | None = None


class JoinedRuns:
    """The run each ``run_id`` was joined with, in memory (a fresh site, a test);
    ``client.state.PersistentJoinedRuns`` keeps it across restarts."""

    def __init__(self, runs: Mapping[str, JoinedRun] | None = None) -> None:
        self.runs: dict[str, JoinedRun] = dict(runs or {})

    def get(self, run_id: str) -> JoinedRun | None:
        return self.runs.get(run_id)

    def record(self, run_id: str, joined: JoinedRun) -> None:
        """Remember ``joined`` for ``run_id`` (durably, in a subclass) before the site acts on the run."""
        self.runs[run_id] = joined
        self.save()

    def save(self) -> None:
        """Nothing to keep in memory; ``PersistentJoinedRuns`` writes its file."""


class SitePolicy:
    """A site's policy (``policy:`` in site.yaml) and its pinned peers, applied to what arrives.
    ``joined``: the runs this site has joined (in memory unless the runtime passes its persistent
    store), against which a changed spec under the same ``run_id`` is refused."""

    def __init__(self, cfg: PolicyConfig, peers: Mapping[int, PublicIdentity] | None = None,
                 joined: JoinedRuns | None = None) -> None:
        self.cfg = cfg
        self.peers: dict[int, PublicIdentity] = dict(peers or {})
        self.joined = joined if joined is not None else JoinedRuns()
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

    def check_run(self, run_id: str, spec: Mapping[str, Any], *, num_sites: int | None = None,
                  site_index: int | None = None) -> RunSpec:
        """Validate Welcome's spec whole, then hold it against the policy and the bounds, and
        against the spec (and, when given, the site layout) this ``run_id`` was first joined with.
        An accepted run is recorded before it is returned. Returns it typed."""
        try:
            parsed = RunSpec.model_validate(spec)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            self.refuse("spec", f"the run's spec is malformed at {where}: {first['msg']}")
        p = self.cfg
        if p.run_id is not None:
            self.require(run_id == p.run_id, "run_id", f"run {run_id!r} is not the run {p.run_id!r} this site joins")
        joined = self._check_same_run(run_id, JoinedRun(spec_digest(spec).hex(), num_sites, site_index))
        if parsed.secagg.enabled:
            self.require(bool(self.peers), "pinned_peers",
                         "the run uses secure aggregation but this site pins no peer keys (`peers` in site.yaml)")
        else:
            self.require(not p.require_secagg, "require_secagg",
                         "the run has secure aggregation off; this site sends no update in the clear")
        # SCAFFOLD's server control variate is taken from the models the site derives, never from
        # the coordinator's word: a chosen c would steer what the site's update says about its data.
        self.require(not parsed.strategy.scaffold or self.derives_models(parsed.secagg.enabled), Rule.DERIVE_MODELS,
                     "the run uses SCAFFOLD, whose server control variate this site takes only from models it "
                     "derives itself (policy.derive_models, under secure aggregation)")
        dp = parsed.dp
        if not dp.enabled:
            self.require(not p.require_dp, "require_dp", "the run has DP-SGD off; this site trains only under DP")
        else:
            self.require(dp.target_epsilon <= p.max_epsilon, "max_epsilon",
                         f"the run asks for epsilon {dp.target_epsilon:g}, above this site's {p.max_epsilon:g}")
            self.require(dp.target_delta <= p.max_delta, "max_delta",
                         f"the run asks for delta {dp.target_delta:g}, above this site's {p.max_delta:g}")
        self.check_bounds(parsed)
        if joined != self.joined.get(run_id):
            self.joined.record(run_id, joined)
        return parsed

    def _check_same_run(self, run_id: str, now: JoinedRun) -> JoinedRun:
        """A run's spec is fixed for its ``run_id``: a new Welcome (a reconnect, a restart) must
        carry the spec it was joined with, and the same site layout. Returns what to record: the
        layout filled in where the first Welcome's was not known."""
        first = self.joined.get(run_id)
        if first is None:
            return now
        self.require(now.spec == first.spec, Rule.SPEC_CHANGED,
                     f"run {run_id!r} was joined with spec {first.spec[:16]}..., this Welcome carries "
                     f"{now.spec[:16]}...; a run's spec cannot change")
        for field in ("num_sites", "site_index"):
            old, new = getattr(first, field), getattr(now, field)
            self.require(old is None or new is None or old == new, Rule.SPEC_CHANGED,
                         f"run {run_id!r} was joined with {field}={old}, this Welcome says {new}")
        return JoinedRun(first.spec, first.num_sites if now.num_sites is None else now.num_sites,
                         first.site_index if now.site_index is None else now.site_index)

    def check_bounds(self, s: RunSpec) -> None:
        """Every training setting the spec chooses, against ``policy.bounds`` (one rule per family)."""
        b = self.cfg.bounds
        m, t = s.model, s.train
        self.require(m.name in b.models, Rule.MODEL, f"model {m.name!r} is not one this site trains {b.models}")
        self.require(m.norm in b.norms, Rule.MODEL, f"normalisation {m.norm!r} is not one of this site's {b.norms}")
        self.require(b.min_width <= m.width <= b.max_width, Rule.MODEL,
                     f"model width {m.width} outside this site's {b.min_width}..{b.max_width}")
        self.require(b.min_lr <= t.lr <= b.max_lr, Rule.TRAIN_BOUNDS,
                     f"learning rate {t.lr:g} outside this site's {b.min_lr:g}..{b.max_lr:g}")
        if t.local_steps is not None:
            self.require(b.min_local_steps <= t.local_steps <= b.max_local_steps, Rule.TRAIN_BOUNDS,
                         f"{t.local_steps} local steps, outside this site's {b.min_local_steps}..{b.max_local_steps}")
        else:
            self.require(b.allow_epochs, Rule.TRAIN_BOUNDS,
                         "local training in epochs: the step count would follow this site's data size "
                         "(this site trains a fixed train.local_steps; policy.bounds.allow_epochs)")
            self.require(t.local_epochs is not None and t.local_epochs <= b.max_local_epochs, Rule.TRAIN_BOUNDS,
                         f"{t.local_epochs} local epochs, more than this site's {b.max_local_epochs}")
        self.require(b.min_batch_size <= t.batch_size <= b.max_batch_size, Rule.TRAIN_BOUNDS,
                     f"batch size {t.batch_size} outside this site's {b.min_batch_size}..{b.max_batch_size}")
        self.require(t.optimizer in b.optimizers, Rule.TRAIN_BOUNDS,
                     f"optimiser {t.optimizer!r} is not one of this site's {b.optimizers}")
        if t.optimizer == "sgd":  # Adam takes no momentum
            self.require(t.momentum <= b.max_momentum, Rule.TRAIN_BOUNDS,
                         f"momentum {t.momentum:g}, above this site's {b.max_momentum:g}")
        self.require(t.weight_decay <= b.max_weight_decay, Rule.TRAIN_BOUNDS,
                     f"weight decay {t.weight_decay:g}, above this site's {b.max_weight_decay:g}")
        adaptive = s.strategy.name in ADAPTIVE_STRATEGIES
        top = b.max_adaptive_server_lr if adaptive else b.max_server_lr
        self.require(s.strategy.server_lr <= top, Rule.TRAIN_BOUNDS,
                     f"server_lr {s.strategy.server_lr:g} for {s.strategy.name}, above this site's {top:g} "
                     f"(policy.bounds.{'max_adaptive_server_lr' if adaptive else 'max_server_lr'})")
        needs_augment = b.require_augment == "always" or (
            b.require_augment == "without_dp" and not s.dp.enabled and s.model.name not in UNAUGMENTABLE)
        self.require(t.augment or not needs_augment, Rule.TRAIN_BOUNDS,
                     f"augmentation off; this site requires it ({b.require_augment})")
        if s.secagg.enabled:
            q = s.secagg
            self.require(q.colluders >= self.cfg.colluders, Rule.SECAGG_BOUNDS,
                         f"the run assumes {q.colluders} colluding sites, this site {self.cfg.colluders}: the sites "
                         "holding this site's shares would certify survivor lists on too few signatures")
            self.require(q.bits in b.secagg_bits, Rule.SECAGG_BOUNDS,
                         f"a {q.bits}-bit ring; this site allows {b.secagg_bits}")
            self.require(q.clip >= b.min_clip, Rule.SECAGG_BOUNDS, f"clip {q.clip:g}, below this site's {b.min_clip:g}")
            self.require(q.max_samples_per_site >= b.min_max_samples_per_site, Rule.SECAGG_BOUNDS,
                         f"max_samples_per_site {q.max_samples_per_site}, below this site's "
                         f"{b.min_max_samples_per_site}")
        if s.dp.enabled:
            d = s.dp
            self.require(b.min_grad_norm <= d.max_grad_norm <= b.max_grad_norm, Rule.DP_BOUNDS,
                         f"DP-SGD clip {d.max_grad_norm:g} outside this site's {b.min_grad_norm:g}..{b.max_grad_norm:g}")
            self.require(d.noise_multiplier == "auto" or float(d.noise_multiplier) >= b.min_noise_multiplier,
                         Rule.DP_BOUNDS, f"noise multiplier {d.noise_multiplier}, below this site's "
                         f"{b.min_noise_multiplier:g}")

    # -- one round -------------------------------------------------------------------------------

    def check_batches(self, spec: RunSpec, site: int) -> None:
        """The run's participation batches (``secagg.batches``), against this site's policy: each
        batch big enough that, with ``colluders`` of its members working for the coordinator,
        ``min_participants`` honest ones are left; every member pinned; this site in one."""
        sa = spec.secagg
        if not sa.enabled:
            return
        if sa.batches is None:
            self.require(not self.cfg.require_batches, Rule.BATCHES,
                         "the run cuts its sites into no participation batches (secagg.batches), so two of its "
                         "sums could differ by one site's input (policy.require_batches)")
            return
        try:
            batches = batch_map(sa.batches)
        except ValueError as exc:
            self.refuse(Rule.BATCHES, f"the run's participation batches: {exc}")
        assert batches is not None
        self.require(site in batches, Rule.BATCHES, f"site {site} is in none of the run's participation batches")
        smallest = min(len(b) for b in batches.values())
        colluders = max(self.cfg.colluders, sa.colluders)
        needed = self.cfg.min_participants + colluders
        self.require(smallest >= needed, Rule.BATCHES,
                     f"a participation batch of {smallest} sites; this site needs {needed} (min_participants "
                     f"{self.cfg.min_participants} + colluders {colluders})")
        self.check_pinned(sorted(batches))

    def check_whole_batches(self, what: str, ids: list[int] | tuple[int, ...],
                            batches: dict[int, frozenset[int]] | None) -> None:
        """``ids`` (a round's participants, advertised sites or survivors) holds whole batches only."""
        if not is_union_of_batches(ids, batches):
            split = sorted(set(ids) - set(complete_batches(ids, batches)))
            self.refuse(Rule.BATCHES, f"the {what} hold part of a participation batch (sites {split} without "
                                      "their whole batch)")

    def check_participants(self, what: str, ids: list[int] | tuple[int, ...]) -> None:
        self.require(len(ids) >= self.cfg.min_participants, "min_participants",
                     f"{len(ids)} {what}, fewer than this site's {self.cfg.min_participants}")

    def check_fit_config(self, config: Mapping[str, Any]) -> None:
        """A FitIns's training config within this site's bounds (FedProx's ``mu``; the ``seed`` is
        ignored, the site draws its own)."""
        mu, cap = config.get("mu", 0.0), self.cfg.bounds.max_mu
        self.require(type(mu) in (int, float) and 0 <= mu <= cap, Rule.TRAIN_BOUNDS,
                     f"FedProx mu {mu!r}, outside this site's 0..{cap:g}")

    def derives_models(self, secure: bool) -> bool:
        """Whether this site trains and evaluates only models it derived (``derive_models``): in runs
        with secure aggregation, whose sums it can verify.  A run in the clear, which
        ``require_secagg`` must allow, sends each update whole anyway."""
        return secure and self.cfg.derive_models

    def check_derived(self, what: str, sent: bytes, own: Sequence[bytes] | None, after: int) -> None:
        """The weights the coordinator sent are, bit for bit, one of the models this site derived
        (``own``: their digests, the kept model's first; None while it sets up)."""
        self.require(own is not None and sent in own, Rule.DERIVE_MODELS,
                     f"{what} carries model {sent.hex()[:16]}, not the one this site derived "
                     + ("(it is still setting up)" if own is None else
                        f"after round {after} ({own[0].hex()[:16]}); policy.derive_models"))

    def check_examples(self, examples: int) -> None:
        """An update from fewer examples than the floor is too close to the examples themselves."""
        self.require(examples >= self.cfg.min_examples, Rule.MIN_EXAMPLES,
                     f"{examples} training examples, fewer than this site's min_examples={self.cfg.min_examples}")

    def count_sent(self, n: int) -> int:
        """The sample count this site puts in a sum or a validation result for ``n`` examples
        (``policy.count``): 1, ``n`` rounded down to a power of two, or ``n``."""
        if self.cfg.count == "exact" or n < 1:
            return n
        return 1 if self.cfg.count == "one" else 1 << (n.bit_length() - 1)

    def metrics_sent(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Evaluation metrics as this site sends them unless ``count: exact``: each to the coarser of
        ``metric_decimals`` decimals and two significant digits.  An exact accuracy is k/n, and a
        few rounds of them give the split's size away; decimals alone do not bound a loss, which a
        crafted model makes ``M·k/n`` for any ``M`` (2^40 gave the exact size: a red-team finding),
        while two significant digits leave ``k/n`` to about 1% whatever the scale."""
        if self.cfg.count == "exact":
            return dict(metrics)
        return {k: coarse(float(v), self.cfg.metric_decimals) for k, v in metrics.items()}

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


def coarse(value: float, decimals: int) -> float:
    """``value`` rounded to the coarser of ``decimals`` decimals and two significant digits."""
    if value == 0 or not math.isfinite(value):
        return value
    significant = 1 - math.floor(math.log10(abs(value)))
    return round(value, min(decimals, significant))
