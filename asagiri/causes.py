"""Why a site declines and why a round attempt aborts: the two closed sets of causes that travel
on the wire (``Decline.rule``, ``RoundAborted.cause``; protocol/SPEC.md §4 and §7).

Both are string enums so that a message, a log line, a Prometheus label and the audit log all
spell a cause the same way, and nothing ever parses prose to find it.  A leaf module: it imports
nothing of ours, so the wire, the policy, the coordinator and the observers can all share it.
"""

from __future__ import annotations

import enum

__all__ = ["AbortCause", "Rule"]


class Rule(enum.StrEnum):
    """The rule behind a site's refusal.  Every policy rule is named after its ``policy:`` key
    where it has one (docs/secagg.md, "Site policy")."""

    # the run as a whole (checked on Welcome)
    RUN_ID = "run_id"
    REQUIRE_SECAGG = "require_secagg"
    PINNED_PEERS = "pinned_peers"
    REQUIRE_DP = "require_dp"
    MAX_EPSILON = "max_epsilon"
    MAX_DELTA = "max_delta"
    SPEC = "spec"  # the run's spec is malformed
    SETUP = "setup"  # the spec is well formed, but the run cannot be set up here (data, model)
    SPEC_CHANGED = "spec_changed"  # another spec (or site layout) than the one this run_id was joined with
    # the run's training settings against the site's bounds (``policy.bounds``)
    MODEL = "model"  # model name, normalisation or width
    TRAIN_BOUNDS = "train_bounds"  # lr, local epochs, batch size, optimiser, momentum, weight decay, augmentation
    SECAGG_BOUNDS = "secagg_bounds"  # ring bits, clip, max_samples_per_site
    DP_BOUNDS = "dp_bounds"  # DP-SGD's per-example clip, a fixed noise multiplier
    # the size of what is summed and shared
    MIN_PARTICIPANTS = "min_participants"
    MIN_GROUP = "min_group"
    MIN_THRESHOLD = "min_threshold"
    MIN_EXAMPLES = "min_examples"  # the site's training set is smaller than its policy's floor
    BATCHES = "batches"  # participation batches missing, too small, or a sum that is not of whole batches
    # one secure-aggregation round
    ROUND_PARAMS = "round_params"
    REPLAY = "replay"
    QUORUM = "quorum"
    COMPONENT = "component"
    STAGE = "stage"
    SIGNATURE = "signature"
    SHARES = "shares"
    SURVIVORS = "survivors"
    MALFORMED = "malformed"
    SUM = "sum"  # the announced sum fails its survivors' vouches (SPEC §6.8)
    DERIVE_MODELS = "derive_models"  # a model this site did not derive itself (SPEC §6.9)
    # the coordinator's signed round records
    RECORD = "record"
    # not a policy rule: the site's privacy budget is spent (always permanent)
    PRIVACY_BUDGET = "privacy_budget"

    @property
    def fix(self) -> str:
        """What an operator does about a refusal by this rule, where one thing is the usual fix."""
        return _FIXES.get(self, "")

    @property
    def is_policy(self) -> bool:
        """A refusal of what the coordinator asked, as opposed to the site having nothing left to give."""
        return self is not Rule.PRIVACY_BUDGET


class AbortCause(enum.StrEnum):
    """Why a round attempt ended without an aggregate (the detail is in ``RoundAborted.detail``)."""

    TOO_FEW_SITES = "too_few_sites"  # a stage ended with fewer than min_clients sites
    NO_QUORUM = "no_quorum"  # fewer survivor signatures than the sites require
    THRESHOLD = "threshold"  # the sharing groups cannot meet the threshold
    UNMASK_FAILED = "unmask_failed"  # too few or inconsistent shares to remove the masks
    UNVERIFIED = "unverified"  # a survivor did not vouch for the sum, or the vouches do not add up to it


_FIXES = {
    Rule.REPLAY: "they entered this round of this run_id before: this run ran already, so give it a new run_id "
                 "(the project's name), or continue it with --resume",
    Rule.DERIVE_MODELS: "the model is not the one they derived: a site's data file is not of the run's data set "
                        "(its classes), or this run_dir is not the run they joined",
    Rule.SPEC_CHANGED: "they joined this run_id with other settings: give a changed run a new run_id",
    Rule.SETUP: "the run cannot be set up at the site: its log names the file or the setting",
}
