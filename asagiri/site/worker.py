"""A site's learning, with no networking: its data, model, local layers, DP-SGD and ledger.

:class:`SiteWorker` lives as long as the site process does (it survives reconnects); the session
in ``client/session.py`` hands it the coordinator's requests and sends back what it returns.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import RunSpec, SiteConfig
from ..data.cache import DecodeSettings
from ..data.loaders import SiteData, load_configured_site
from ..initial import derived_initial, initial_key
from ..models import build, prepare_data, shared_keys
from ..params import Params, summed_layout, update_norm
from ..policy import SitePolicy
from ..train import TrainResult, evaluate, train_local
from ..train.accel import Accel
from ..train.loop import OnStep
from ..wire.messages import EvaluateIns, EvaluateRes, FitIns, FitRes, Welcome

if TYPE_CHECKING:
    from ..privacy.ledger import PrivacyLedger
    from .control import OwnControl

__all__ = ["BudgetExhausted", "SiteWorker"]

log = logging.getLogger(__name__)


class UnusableInstruction(ValueError):
    """What the coordinator sent cannot be trained or evaluated here (wrong tensors, a bad config).
    The learning layer knows nothing of the wire: the session turns this into a closed session."""


class BudgetExhausted(Exception):
    """One more round would spend more privacy than the site's target: it declines, permanently
    (``Rule.PRIVACY_BUDGET``; the amounts stay in the site's log)."""

    def __init__(self, spent: float, target: float) -> None:
        super().__init__(f"privacy budget: epsilon {spent:.3f} of {target:g} spent; one more round would exceed it")


class SiteWorker:
    """Everything a site keeps across rounds and reconnects: spec, data, model, local layers."""

    def __init__(self, cfg: SiteConfig, welcome: Welcome, spec: RunSpec) -> None:
        self.run_id = welcome.run_id
        self.model_cfg = spec.model
        self.train_cfg = spec.train
        self.strategy_cfg = spec.strategy
        self.data_cfg = spec.data
        self.spec = welcome.spec
        # What leaves the site is never longer than the site's own ceiling, whatever the spec says.
        self.update_bound = update_ceiling(spec.train.max_update_norm, cfg.policy.bounds.max_update_norm)
        self.train_seed = cfg.train_seed  # None: a fresh seed from the OS each round
        self.device = _pick_device(cfg.device)
        part = self.data_cfg.partition
        # The site's data is its own: all of it, or (a simulation) the share its own config names.
        # Welcome's site_index and num_sites are the coordinator's words and change nothing here.
        sim = cfg.simulation
        data_cfg = self.data_cfg if sim is not None else self.data_cfg.model_copy(update={
            "partition": part.model_copy(update={"scheme": "iid", "seed": cfg.split_seed}),
            "val_fraction": cfg.val_fraction})
        self.data: SiteData = load_configured_site(
            data_cfg, path=cfg.data_path, site_index=0 if sim is None else sim.share,
            num_sites=1 if sim is None else sim.shares, cache_dir=cfg.state_dir / "cache",
            decode=DecodeSettings(cfg.decode_workers, cfg.skip_unreadable_images),
            compact=True)  # uint8: a quarter of the float share
        where = "its own data, whole" if sim is None else f"simulated share {sim.share} of {sim.shares}"
        self.data = prepare_data(self.model_cfg.name, self.data)  # fixed features, for models that take them
        torch.manual_seed(part.seed)
        self.model = build(
            self.model_cfg.name, in_channels=self.data.channels, num_classes=self.data.num_classes,
            width=self.model_cfg.width, norm=self.model_cfg.norm, groups=self.model_cfg.groups,
        ).to(self.device)
        self.dp = spec.dp
        a = cfg.accel
        self.accel = Accel.resolve(precision=a.precision, channels_last=a.channels_last, compile=a.compile,
                                   dp_clipping=a.dp_clipping, device=self.device, private=self.dp.enabled,
                                   averaged_copies=spec.train.augment and self.dp.augmentation_multiplicity > 1)
        log.info("training on %s: %s", self.device, self.accel.describe())
        self.ledger: PrivacyLedger | None = None
        self.last_steps = 0  # optimiser steps of the last round; stays on the site
        if self.dp.enabled:
            self._setup_dp(cfg, spec.rounds)
        self.shared = shared_keys(self.model, fedbn=self.strategy_cfg.fedbn)
        # W_0 as this site derives it from the run alone (SPEC §6.9): the start of its trajectory.
        self.initial = derived_initial(spec.model, dp=self.dp.enabled, fedbn=self.strategy_cfg.fedbn,
                                       channels=self.data.channels, classes=self.data.num_classes,
                                       key=initial_key(self.run_id, welcome.spec))
        state = self.model.state_dict()
        # The largest thing the coordinator may send this site: the shared parameters (FitIns, EvaluateIns).
        self.shared_bytes = sum(state[k].numel() * 4 for k in self.shared)
        # What a secure round sums: the shared values, and SCAFFOLD's control variate per trained value.
        summed = summed_layout({k: state[k] for k in self.shared}, controls=self.strategy_cfg.scaffold)
        self.summed_values = sum(v.numel() for v in summed.values())
        log.info(
            "site data: %d train / %d val / %s test images (%s), device %s",
            len(self.data.train), len(self.data.val), len(self.data.test), where, self.device,
        )

    def _setup_dp(self, cfg: SiteConfig, rounds: int) -> None:
        # Opacus (and the SciPy it pulls in) costs two seconds of start-up: only DP sites pay it.
        from ..privacy.engine import dp_compatible, noise_for_target, steps_per_round
        from ..privacy.ledger import PrivacyLedger

        self.model, changed = dp_compatible(self.model)
        self.model.to(self.device)
        if changed:
            log.info("DP-SGD: BatchNorm layers converted to GroupNorm (per-sample gradients need it)")
        log.warning("DP-SGD runs with Opacus secure_mode off: its noise comes from torch's generator, "
                    "not a cryptographic one")
        self.ledger = PrivacyLedger(cfg.state_dir / "privacy_ledger.json", delta=self.dp.target_delta)
        t = self.train_cfg
        self.sample_rate, self.steps = steps_per_round(len(self.data.train), t.batch_size, t.local_epochs,
                                                       t.local_steps)
        if self.dp.noise_multiplier == "auto":
            self.sigma = noise_for_target(target_epsilon=self.dp.target_epsilon, delta=self.dp.target_delta,
                                          sample_rate=self.sample_rate, steps=self.steps * rounds)
        else:
            self.sigma = float(self.dp.noise_multiplier)
        log.info("DP-SGD: sigma=%.3f for epsilon=%g, delta=%g over %d rounds x %d steps at sample rate %.4f; "
                 "spent so far: epsilon=%.3f", self.sigma, self.dp.target_epsilon, self.dp.target_delta, rounds,
                 self.steps, self.sample_rate, self.ledger.epsilon())

    def budget_left(self) -> bool:
        assert self.ledger is not None
        return not self.ledger.would_exceed(noise_multiplier=self.sigma, sample_rate=self.sample_rate,
                                            steps=self.steps, target_epsilon=self.dp.target_epsilon)

    def matches(self, welcome: Welcome) -> bool:
        return welcome.run_id == self.run_id and welcome.spec == self.spec

    def _load_global(self, params: dict[str, np.ndarray]) -> None:
        if set(params) != set(self.shared):
            raise UnusableInstruction("coordinator sent parameters that are not this model's shared set")
        state = self.model.state_dict()
        for k in self.shared:
            if tuple(params[k].shape) != tuple(state[k].shape) or params[k].dtype != np.float32:
                raise UnusableInstruction(f"coordinator sent {k} as {params[k].dtype} {params[k].shape}")
            if not np.isfinite(params[k]).all():
                raise UnusableInstruction(f"coordinator sent {k} with non-finite values")
        # Only shared tensors are replaced; FedBN's local normalisation layers stay as they are.
        self.model.load_state_dict({k: torch.from_numpy(params[k]) for k in self.shared}, strict=False)

    def expected_steps(self) -> int:
        """About how many updates a round makes (a progress bar's length): DP-SGD's planned steps,
        or the spec's (``TrainConfig.steps_per_round``)."""
        if self.ledger is not None:
            return self.steps
        return self.train_cfg.steps_per_round(len(self.data.train))

    def train(self, ins: FitIns, on_step: OnStep | None = None,
              scaffold: tuple[Params | None, OwnControl] | None = None) -> tuple[dict[str, np.ndarray], TrainResult]:
        """Train from the global parameters; returns ``local - global`` per shared tensor, in
        ``ins.params`` order.  ``scaffold``: the server's optimiser state as this site derived it
        (its ``c``) and the site's own control variate: training takes the correction ``c - c_i``,
        and the result goes on with ``c_i+ - c_i`` by the ``c/`` names (SPEC §6.3's order)."""
        self._load_global(ins.params)
        correction = None
        if scaffold is not None:
            correction = {k: torch.from_numpy(v).to(self.device) for k, v in scaffold[1].correction(scaffold[0]).items()}
        result = (self._train_private(ins, on_step, correction) if self.ledger is not None
                  else self._train_plain(ins, on_step, correction))
        state = self.model.state_dict()
        delta = {k: state[k].detach().cpu().numpy().astype(np.float32) - ins.params[k] for k in ins.params}
        delta = bound_norm(delta, self.update_bound)
        if scaffold is not None:
            delta.update(scaffold[1].propose(ins.round, result.mean_gradient or {}))
        return delta, result

    def round_seed(self, ins: FitIns) -> int:
        """The seed of this round's training (batch order, augmentation, DP-SGD's sampling), drawn
        by the site: FitIns.config's ``seed`` is the coordinator's and is ignored, so it can
        neither make two rounds train alike nor know the randomness it would have to subtract.
        With ``train_seed`` set (a simulation) it is derived from it, the round and the attempt,
        as the demo's coordinator derived its own from ``selection.seed`` (recorded runs replay)."""
        if self.train_seed is None:
            return secrets.randbits(63)
        return (self.train_seed * 1_000_003 + ins.round * 101 + ins.attempt) % (1 << 63)

    def _train_plain(self, ins: FitIns, on_step: OnStep | None, correction: dict[str, torch.Tensor] | None) -> TrainResult:
        mu, seed = _fit_config(ins), self.round_seed(ins)
        t = self.train_cfg
        # FedProx pulls the shared parameters only: FedBN's local layers are the site's own
        anchor = {k: torch.from_numpy(ins.params[k]).to(self.device) for k in ins.params} if mu > 0 else None
        return train_local(
            self.model, self.data.train, epochs=t.local_epochs, steps=t.local_steps, batch_size=t.batch_size, lr=t.lr,
            optimizer=t.optimizer, momentum=t.momentum, weight_decay=t.weight_decay,
            mu=mu, anchor=anchor, correction=correction, augment=t.augment, seed=seed,
            device=self.device, task=self.data.task, on_step=on_step, accel=self.accel,
        )

    def _train_private(self, ins: FitIns, on_step: OnStep | None,
                       correction: dict[str, torch.Tensor] | None) -> TrainResult:
        assert self.ledger is not None
        if not self.budget_left():
            raise BudgetExhausted(self.ledger.epsilon(), self.dp.target_epsilon)
        from ..privacy.engine import train_dp

        t = self.train_cfg
        mu, seed = _fit_config(ins), self.round_seed(ins)
        anchor = {k: torch.from_numpy(ins.params[k]).to(self.device) for k in ins.params} if mu > 0 else None
        r = train_dp(
            self.model, self.data.train, epochs=t.local_epochs, steps=t.local_steps, expected_batch=t.batch_size,
            lr=t.lr,
            optimizer=t.optimizer, momentum=t.momentum, weight_decay=t.weight_decay, noise_multiplier=self.sigma,
            max_grad_norm=self.dp.max_grad_norm, mu=mu, anchor=anchor, correction=correction, augment=t.augment,
            multiplicity=self.dp.augmentation_multiplicity,
            seed=seed, device=self.device, task=self.data.task, on_step=on_step, accel=self.accel,
        )
        eps = self.ledger.record(ins.round, noise_multiplier=r.noise_multiplier, sample_rate=r.sample_rate,
                                 steps=r.steps)
        log.info("round %d: DP-SGD %d steps, epsilon spent %.3f of %g", ins.round, r.steps, eps,
                 self.dp.target_epsilon)
        return TrainResult(num_samples=r.num_samples, loss=r.loss, steps=r.steps, mean_gradient=r.mean_gradient)

    def privacy_metrics(self) -> dict[str, float]:
        if self.ledger is None:
            return {}
        return {"epsilon": self.ledger.epsilon(), "noise_multiplier": self.sigma}

    def fit(self, ins: FitIns, policy: SitePolicy, on_step: OnStep | None = None) -> FitRes:
        """The plaintext update (secure aggregation off): ``c * delta`` and ``c``, where ``c`` is
        what the site's policy makes of the number of training examples (``count_sent``)."""
        delta, result = self.train(ins, on_step)
        n = policy.count_sent(result.num_samples)
        update = {k: (n * v).astype(np.float32) for k, v in delta.items()}
        self.last_steps = result.steps  # local only: the step count would tell the coordinator the data size
        return FitRes(ins.round, ins.attempt, update, n, {"train_loss": result.loss})

    def evaluate(self, ins: EvaluateIns, policy: SitePolicy) -> EvaluateRes:
        """Score the global model on the validation or test split.  The result carries the count
        and the metrics as the site's policy shows them (``count_sent``, ``metrics_sent``); a test
        result carries one score per example instead only where the policy shares predictions."""
        self._load_global(ins.params)
        split = self.data.val if ins.split == "val" else self.data.test
        res = evaluate(self.model, split, device=self.device, task=self.data.task, accel=self.accel)
        predictions = {}
        if ins.split == "test" and policy.cfg.share_predictions:
            predictions = {"scores": res.scores.astype(np.float32), "labels": np.ascontiguousarray(res.labels)}
        privacy = self.privacy_metrics() if policy.cfg.report_privacy else {}
        metrics = {**policy.metrics_sent(res.metrics()), **privacy}
        num_examples = res.num_examples if predictions else policy.count_sent(res.num_examples)
        return EvaluateRes(ins.round, ins.split, num_examples, metrics, predictions)


def update_ceiling(asked: float | None, ceiling: float) -> float:
    """The norm a site scales its update to: the spec's ``train.max_update_norm`` or the site's
    ``policy.bounds.max_update_norm``, whichever is smaller (the site's when the spec sets none)."""
    return ceiling if asked is None else min(asked, ceiling)


def bound_norm(delta: dict[str, np.ndarray], bound: float | None) -> dict[str, np.ndarray]:
    """``delta`` scaled down, as one vector, to L2 norm ``bound`` if it is longer (None: as is)."""
    if bound is None:
        return delta
    norm = update_norm(delta)
    if norm <= bound:
        return delta
    log.info("update norm %.4g scaled down to %g (the smaller of train.max_update_norm and the site's "
             "policy.bounds.max_update_norm)", norm, bound)
    scale = np.float32(bound / norm)
    return {k: v * scale for k, v in delta.items()}


def _fit_config(ins: FitIns) -> float:
    """FitIns.config's proximal weight, checked, and its ``seed`` checked and then ignored (the site
    draws its own, :meth:`SiteWorker.round_seed`): a malformed value is the coordinator's error."""
    mu, seed = ins.config.get("mu", 0.0), ins.config.get("seed", 0)
    if type(mu) not in (int, float) or not 0 <= mu < float("inf") or type(seed) is not int or not 0 <= seed < 2**63:
        raise UnusableInstruction(f"FitIns config mu={mu!r}, seed={seed!r}: not a proximal weight and a seed")
    return float(mu)


def _pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was requested but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")
