"""Non-IID learning experiments on the bundled data: centralised, local-only, FedAvg, FedProx, FedBN,
FedProx + FedBN, under label skew (Dirichlet) or feature shift.

    python benchmarks/experiments.py --dataset pneumoniamnist --scheme dirichlet --rounds 15 --seeds 0
    python benchmarks/experiments.py --dataset pneumoniamnist --scheme feature --rounds 15 --seeds 0

The federation is simulated in one process, sites one after another, with the runtime's own
pieces: ``load_site_data`` partitions, ``train_local`` (FedProx term), ``shared_keys(fedbn=...)``
and ``apply_weighted_delta`` (FedAvg).  Secure aggregation is left out here because it changes
the sum only within its quantisation bound (``tests/e2e/test_secagg.py`` checks exactly that);
the runtime's own end-to-end runs are in ``docs/results.md`` too.

Evaluation: the official test split, shared out over the sites (under label skew, in each site's
training label proportions; otherwise evenly); each site scores its share with *its*
model (the global weights, plus its own normalisation layers under FedBN; its own model for
local-only), and the predictions are pooled into one AUC and accuracy (``test_auc``).  Pooling
penalises sites whose models score on different scales (FedBN, local-only), so the mean of the
sites' own AUCs on their shares is reported too (``test_auc_site_mean``).  Centralised trains one
model on every site's training data and scores the whole test split.  One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from asagiri.config import ModelConfig
from asagiri.data import load_site_data
from asagiri.data.loaders import SiteData, Split, open_dataset, site_indices, to_split
from asagiri.models import MODEL_NAMES, build, prepare_data, prepare_split, shared_keys, trains_on_features
from asagiri.privacy.engine import noise_for_target, steps_per_round, train_dp
from asagiri.scores import accuracy_score, auc_score
from asagiri.strategy.aggregate import apply_weighted_delta
from asagiri.train import evaluate, train_local

METHODS = ("central", "local", "fedavg", "fedprox", "fedbn", "fedprox+fedbn")


class WSConv2d(torch.nn.Conv2d):
    """Weight standardisation (Qiao et al. 2019): each filter normalised to zero mean, unit variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return torch.nn.functional.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias, self.stride,
                                          self.padding, self.dilation, self.groups)


def split_seed(args: argparse.Namespace, seed: int) -> int:
    """The partition's seed: ``--split-seed`` when given (one split, several training seeds), else the run's."""
    return seed if args.split_seed is None else args.split_seed


def new_model(data: SiteData, args: argparse.Namespace, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build(args.model, in_channels=data.channels, num_classes=data.num_classes, width=args.width,
                  norm=args.norm, groups=args.groups)
    if args.weight_std:
        for parent in list(model.modules()):
            for name, conv in list(parent.named_children()):
                if type(conv) is torch.nn.Conv2d:
                    ws = WSConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                  bias=conv.bias is not None)
                    ws.load_state_dict(conv.state_dict())
                    setattr(parent, name, ws)
    return model


def as_tensors(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in params.items()}


def load_global(models: list[torch.nn.Module], params: dict[str, np.ndarray]) -> None:
    """The global weights into every site's model; each keeps its local layers under FedBN."""
    for m in models:
        m.load_state_dict(as_tensors(params), strict=False)


def own_population_tests(args: argparse.Namespace, seed: int) -> list[Split] | None:
    """Under label skew: each site's share of the official test split in its own label mix."""
    if args.scheme != "dirichlet":
        return None
    raw = open_dataset(args.dataset, None)
    parts = site_indices(raw, args.dataset, "test", args.sites, scheme="dirichlet", alpha=args.alpha,
                         seed=split_seed(args, seed), test_follows_site=True)
    return [prepare_split(args.model, to_split(raw.images["test"][p], raw.labels["test"][p], raw.task, None))
            for p in parts]


def own_population(models: list[torch.nn.Module], tests: list[Split] | None, task: str) -> dict:
    """Mean of each site's AUC on test data in its own label mix (sites with both classes only)."""
    if tests is None:
        return {}
    r = pooled(models, tests, task)  # only its per-site part: pooling own-mix shares is meaningless
    minority = [int(min(np.bincount(t.labels.reshape(-1).long().numpy(), minlength=2))) for t in tests]
    return {
        "own_test_auc_site_mean": r["test_auc_site_mean"],
        "own_test_auc_sites": r["test_auc_sites"],
        "own_test_minority_counts": minority,
    }


def pooled(models: list[torch.nn.Module], tests: list[Split], task: str) -> dict[str, float]:
    scores, labels = [], []
    for m, t in zip(models, tests, strict=True):
        r = evaluate(m, t, task=task)
        scores.append(r.scores)
        labels.append(r.labels)
    s, y = np.concatenate(scores), np.concatenate(labels)
    per_site = [auc_score(lab, sc) for sc, lab in zip(scores, labels, strict=True)]
    return {
        "test_auc": auc_score(y, s), "test_accuracy": accuracy_score(y, s), "test_examples": int(len(y)),
        # each site's AUC on its own share, averaged: what a site sees of its own model
        "test_auc_site_mean": float(np.mean([a for a in per_site if a is not None])),
        "test_auc_sites": [None if a is None else round(a, 4) for a in per_site],
    }


def cosine_lr(base: float, round_index: int, rounds: int, *, floor: float = 0.1) -> float:
    """Round ``round_index`` (0-based) of ``rounds``: cosine decay from ``base`` to ``floor * base``."""
    if not 0 <= floor <= 1:
        raise ValueError("floor must be in [0, 1]")
    progress = min(max(round_index, 0), rounds - 1) / max(rounds - 1, 1)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(args: argparse.Namespace, rnd: int) -> float:
    if args.lr_schedule == "constant":
        return args.lr
    return cosine_lr(args.lr, rnd, args.rounds, floor=args.lr_floor)


def train_kw(args: argparse.Namespace, seed: int, task: str, rnd: int = 0, state: dict | None = None) -> dict:
    return dict(epochs=args.local_epochs, batch_size=args.batch_size, lr=lr_at(args, rnd), augment=augments(args), seed=seed,
                task=task, optimizer=args.optimizer, weight_decay=args.weight_decay, optimizer_state=state)


def augments(args: argparse.Namespace) -> bool:
    """Random shifts for image models; none for models on fixed features."""
    return not trains_on_features(args.model)


def dp_sigma(site: SiteData, args: argparse.Namespace) -> float:
    q, steps = steps_per_round(len(site.train), args.batch_size, args.local_epochs)
    return noise_for_target(target_epsilon=args.dp_epsilon, delta=args.dp_delta, sample_rate=q,
                            steps=steps * args.rounds)


def run(method: str, args: argparse.Namespace, seed: int) -> dict:
    sites = [
        prepare_data(args.model, load_site_data(dataset=args.dataset, path=None, site_index=i, num_sites=args.sites,
                                                scheme=args.scheme, alpha=args.alpha, seed=split_seed(args, seed)))
        for i in range(args.sites)
    ]
    task = sites[0].task
    tests = [s.test for s in sites]
    sigmas: list[float] = []
    trajectory: list[float] = []  # --track: the global model's pooled test AUC after each round
    extra: dict = {}
    t0 = time.perf_counter()
    if method == "central":
        train = Split(torch.cat([s.train.images for s in sites]), torch.cat([s.train.labels for s in sites]))
        model = new_model(sites[0], args, seed)
        for epoch in range(args.rounds):
            train_local(model, train, **train_kw(args, seed * 1000 + epoch, task, epoch))
        models = [model] * args.sites
        result = pooled(models, tests, task)
    elif method == "local":
        models = []
        for i, s in enumerate(sites):
            m = new_model(s, args, seed)
            for epoch in range(args.rounds):
                train_local(m, s.train, **train_kw(args, seed * 1000 + epoch * 10 + i, task, epoch))
            models.append(m)
        result = pooled(models, tests, task)
    else:
        fedbn = "fedbn" in method
        mu = args.mu if "fedprox" in method else 0.0
        models = [new_model(s, args, seed) for s in sites]  # same init everywhere
        sigmas = [dp_sigma(s, args) for s in sites] if args.dp_epsilon else [0.0] * len(sites)
        keys = shared_keys(models[0], fedbn=fedbn)
        averages: dict[float, dict[str, np.ndarray]] = {}
        velocity = None
        opt_states: list[dict | None] = [None] * len(sites)  # --keep-optimizer: each site's moments
        global_params = {k: models[0].state_dict()[k].numpy().astype(np.float32).copy() for k in keys}
        for rnd in range(args.rounds):
            total = {k: np.zeros(v.shape, np.float64) for k, v in global_params.items()}
            squares: dict[str, np.ndarray] = {}
            n_total = 0
            for i, (m, s) in enumerate(zip(models, sites, strict=True)):
                load_global([m], global_params)
                if args.dp_epsilon:
                    anchor = as_tensors(global_params) if mu > 0 else None
                    r = train_dp(m, s.train, epochs=args.local_epochs, expected_batch=args.batch_size,
                                 lr=lr_at(args, rnd), optimizer=args.optimizer, momentum=0.9,
                                 noise_multiplier=sigmas[i], max_grad_norm=args.clip, mu=mu,
                                 anchor=anchor, multiplicity=args.aug_mult, seed=seed * 1000 + rnd * 10 + i,
                                 task=task, optimizer_state=opt_states[i], augment=augments(args))
                else:
                    r = train_local(m, s.train, mu=mu,
                                    **train_kw(args, seed * 1000 + rnd * 10 + i, task, rnd, opt_states[i]))
                if args.keep_optimizer:
                    opt_states[i] = r.optimizer_state
                state = m.state_dict()
                for k in keys:
                    total[k] += r.num_samples * (state[k].numpy() - global_params[k])
                    if args.pooled_bn_var and k.endswith("running_mean"):
                        squares[k] = squares.get(k, 0.0) + r.num_samples * state[k].numpy().astype(np.float64) ** 2
                n_total += r.num_samples
            mean = {k: (v / n_total).astype(np.float32) for k, v in total.items()}
            for k_mean, sq in squares.items():  # var of the pooled data = mean of vars + spread of the means
                k_var = k_mean.replace("running_mean", "running_var")
                new_mean = global_params[k_mean] + mean[k_mean].astype(np.float64)
                mean[k_var] = (mean[k_var] + sq / n_total - new_mean**2).astype(np.float32)
            global_params, velocity = apply_weighted_delta(global_params, mean, server_lr=args.server_lr,
                                                           momentum=args.server_momentum, velocity=velocity)
            # averages of the global models over rounds: post-processing, no privacy cost
            for decay in ({args.ema} if args.ema else set()) | set(args.ema_also):
                avg = averages.get(decay)
                averages[decay] = {k: v.copy() for k, v in global_params.items()} if avg is None else {
                    k: decay * avg[k] + (1 - decay) * global_params[k] for k in keys
                }
            if args.track:
                load_global(models, global_params)
                trajectory.append(round(pooled(models, tests, task)["test_auc"], 4))
        extra["ema_test_auc"] = {}
        for decay in args.ema_also:
            load_global(models, averages[decay])
            extra["ema_test_auc"][str(decay)] = round(pooled(models, tests, task)["test_auc"], 4)
        load_global(models, averages[args.ema] if args.ema else global_params)
        result = pooled(models, tests, task)
    # the sites' validation splits, each scored by its model and pooled: what settings are chosen by
    extra["val_auc"] = round(pooled(models, [s.val for s in sites], task)["test_auc"], 4)
    return {
        "method": method, "dataset": args.dataset, "scheme": args.scheme, "alpha": args.alpha, "seed": seed,
        "split_seed": split_seed(args, seed),
        "rounds": args.rounds, "sizes": [len(s.train) for s in sites], "norm": args.norm, "width": args.width,
        "wall_s": round(time.perf_counter() - t0, 1), **result, **extra,
        **({"round_test_auc": trajectory} if args.track else {}),
        **own_population(models, own_population_tests(args, seed), task),
        "dp_epsilon": args.dp_epsilon, "dp_delta": args.dp_delta if args.dp_epsilon else None, "clip": args.clip,
        "aug_mult": args.aug_mult, "ema": args.ema, "lr": args.lr, "lr_schedule": args.lr_schedule,
        "lr_floor": args.lr_floor, "optimizer": args.optimizer, "weight_decay": args.weight_decay,
        "batch_size": args.batch_size, "local_epochs": args.local_epochs, "groups": args.groups,
        "weight_std": args.weight_std, "keep_optimizer": args.keep_optimizer, "pooled_bn_var": args.pooled_bn_var, "mu": args.mu if "fedprox" in method else None,
        "server_lr": args.server_lr, "server_momentum": args.server_momentum,
        "sigmas": [round(x, 3) for x in sigmas] if method not in ("central", "local") and args.dp_epsilon else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="pneumoniamnist")
    p.add_argument("--scheme", default="dirichlet", choices=["iid", "dirichlet", "quantity", "feature"])
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=15, help="rounds of --local-epochs each (central/local: epochs)")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--split-seed", type=int, default=None,
                   help="partition with this seed for every run (default: each run's own seed)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--model", default="small_cnn", choices=MODEL_NAMES)
    p.add_argument("--norm", default="batch", choices=["batch", "group"])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="cosine: each round's local learning rate decays from --lr to --lr-floor times it")
    p.add_argument("--lr-floor", type=float, default=0.1)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--keep-optimizer", action="store_true",
                   help="federated: each site resumes its optimizer's moments from its previous round")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--groups", type=int, default=ModelConfig().groups, help="GroupNorm groups")
    p.add_argument("--weight-std", action="store_true", help="weight-standardised convolutions")
    p.add_argument("--pooled-bn-var", action="store_true",
                   help="FedAvg: aggregate BatchNorm running variances as the pooled data's variance")
    p.add_argument("--aug-mult", type=int, default=1, help="DP: augmentation multiplicity K")
    p.add_argument("--server-lr", type=float, default=1.0, help="FedAvgM: server learning rate")
    p.add_argument("--server-momentum", type=float, default=0.0, help="FedAvgM: server momentum")
    p.add_argument("--ema-also", type=float, nargs="*", default=[],
                   help="also score averages of the global models with these decays (ema_test_auc)")
    p.add_argument("--track", action="store_true", help="record the pooled test AUC after every round")
    p.add_argument("--ema", type=float, default=0.0,
                   help="evaluate an exponential moving average of the global models with this decay")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mu", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dp-epsilon", type=float, default=None, help="federated methods train with DP-SGD at this epsilon")
    p.add_argument("--dp-delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0, help="DP-SGD per-sample clipping norm")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        for method in args.methods:
            print(json.dumps(run(method, args, seed)), flush=True)


if __name__ == "__main__":
    main()
