"""Non-IID learning experiments on the bundled data, through the product's own code path.

    python benchmarks/experiments.py --dataset pneumoniamnist --scheme dirichlet --rounds 15 --seeds 0
    python benchmarks/experiments.py --model scatter_linear --optimizer sgd --lr 0.01 --local-steps 40 \\
        --methods fedavg --seeds 0

Federated methods run as a whole federation in one process (``asagiri.local.run_local``): the
coordinator's driver, strategy and pooled test, and for each site its session, policy,
``SiteWorker`` (partition, model, training loop, DP-SGD and ledger) and secure-aggregation
machine, exactly as ``asagiri-coordinator`` and ``asagiri-client`` run them over TCP.  Every
option below is a key of fed.yaml (printed with each result as ``config``).  Secure aggregation
is on, as the product's default; ``--no-secagg`` turns it off.

Baselines that are not federations: ``central`` trains one model on every site's training data,
``local`` trains each site alone; both with the product's training loop, scored the same way.

Evaluation (``summary.json``): the official test split, shared out over the sites; each site scores
its share with the final global model (plus its own normalisation layers under FedBN) and the
predictions are pooled into one AUC and accuracy (``test_auc``); ``test_auc_site_mean`` averages
each site's own AUC on its share.  ``val_auc``: the sample-weighted mean of the sites' validation
AUCs after the last round, what the coordinator records in ``metrics.jsonl``.  One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import numpy as np
import torch

from asagiri.config import DEFAULT_LOCAL_STEPS, ModelConfig
from asagiri.data import load_site_data
from asagiri.data.loaders import Split
from asagiri.local import lay_out, run_local
from asagiri.models import MODEL_NAMES, build, prepare_data
from asagiri.scores import accuracy_score, auc_score
from asagiri.train import evaluate, train_local

METHODS = ("central", "local", "fedavg", "fedprox", "fedbn", "fedprox+fedbn", "fedavgm", "fedadam", "fedyogi",
           "fedadagrad", "fedadam+fedbn", "fedyogi+fedbn", "scaffold", "fedadam+scaffold", "fedavgm+scaffold")
SERVER_OPTIMISERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")  # else plain FedAvg


def split_seed(args: argparse.Namespace, seed: int) -> int:
    """The partition's seed: ``--split-seed`` when given (one split, several training seeds), else the run's."""
    return seed if args.split_seed is None else args.split_seed


def federation_overrides(method: str, args: argparse.Namespace, seed: int) -> list[str]:
    """The fed.yaml keys of one run."""
    # a method is its server optimiser and the parts it combines with it ("fedyogi+fedbn")
    parts = method.split("+")
    strategy = next((p for p in parts if p in SERVER_OPTIMISERS), "fedavg")
    momentum = args.server_momentum if args.server_momentum is not None else (0.9 if strategy == "fedavgm" else 0.0)
    out = [
        f"data.dataset={args.dataset}", *([f"data.path={args.path.resolve()}"] if args.path else []),
        f"data.partition.scheme={args.scheme}", f"data.partition.alpha={args.alpha}",
        f"data.partition.seed={split_seed(args, seed)}", f"selection.seed={seed}",
        f"model.name={args.model}", f"model.norm={args.norm}", f"model.width={args.width}", f"model.groups={args.groups}",
        *schedule(args), f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
        f"train.optimizer={args.optimizer}", f"train.weight_decay={args.weight_decay}",
        f"train.augment={str(augments(args)).lower()}",
        f"strategy.name={strategy}", f"strategy.mu={args.mu if 'fedprox' in parts else 0.0}",
        f"strategy.fedbn={str('fedbn' in parts).lower()}", f"strategy.server_momentum={momentum}",
        f"strategy.scaffold={str('scaffold' in parts).lower()}",
        *([f"strategy.server_lr={args.server_lr}"] if args.server_lr is not None else []),
        f"secagg.enabled={str(args.secagg).lower()}", f"min_clients={min(3, args.sites)}",
        "timeouts.wait_for_sites=60",
    ]
    if args.dp_epsilon:
        out += ["dp.enabled=true", f"dp.target_epsilon={args.dp_epsilon}", f"dp.target_delta={args.dp_delta}",
                f"dp.max_grad_norm={args.clip}", f"dp.augmentation_multiplicity={args.aug_mult}"]
    return out


def schedule(args: argparse.Namespace) -> list[str]:
    """The local-training keys: ``--local-epochs`` or ``--local-steps``, else the spec's default."""
    if args.local_epochs is not None:
        return [f"train.local_epochs={args.local_epochs}"]
    return [f"train.local_steps={args.local_steps}"] if args.local_steps is not None else []


def federated(method: str, args: argparse.Namespace, seed: int) -> dict:
    overrides = federation_overrides(method, args, seed)
    with tempfile.TemporaryDirectory() as tmp:
        # Sites' policy floors follow the federation's size; everything else is the default policy.
        policy = {"min_participants": min(3, args.sites), "min_group": min(3, args.sites),
                  "report_privacy": bool(args.dp_epsilon), "count": args.count,
                  "bounds": {"allow_epochs": args.local_epochs is not None}}
        cfg, sites = lay_out(Path(tmp), sites=args.sites, rounds=args.rounds, overrides=overrides,
                             site_extra={i: {"policy": policy, "threads": args.threads}
                                         for i in range(1, args.sites + 1)})
        summary = anyio.run(run_local, cfg, sites)
        metrics = Path(tmp) / "metrics.jsonl"  # none when no round completed
        records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    last = records[-1] if records else {}
    return {
        "status": summary["status"], "test_auc": summary.get("test_auc"), "test_accuracy": summary.get("test_accuracy"),
        "test_auc_site_mean": summary.get("test_auc_site_mean"), "test_site_auc": summary.get("test_site_auc"),
        "test_examples": summary.get("test_examples"), "val_auc": last.get("auc"), "epsilon": summary.get("epsilon") or None,
        "noise_multiplier": summary.get("noise_multiplier") or None, "config": overrides,
    }


def augments(args: argparse.Namespace) -> bool:
    """Random shifts for image models; none for models on fixed features."""
    return args.model != "scatter_linear"


def baseline(method: str, args: argparse.Namespace, seed: int) -> dict:
    """Centralised or local-only training, with the product's training loop and test shares."""
    sites = [
        prepare_data(args.model, load_site_data(dataset=args.dataset, path=args.path, site_index=i, num_sites=args.sites,
                                                scheme=args.scheme, alpha=args.alpha, seed=split_seed(args, seed)))
        for i in range(args.sites)
    ]
    task = sites[0].task

    def model() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build(args.model, in_channels=sites[0].channels, num_classes=sites[0].num_classes, width=args.width,
                     norm=args.norm, groups=args.groups)

    def fit(m: torch.nn.Module, data: Split, seed_of: Callable[[int], int]) -> None:
        steps = None if args.local_epochs is not None else (args.local_steps or DEFAULT_LOCAL_STEPS)
        for rnd in range(args.rounds):  # as much local training as a federation's rounds
            train_local(m, data, epochs=args.local_epochs, steps=steps, batch_size=args.batch_size, lr=args.lr,
                        optimizer=args.optimizer, weight_decay=args.weight_decay, augment=augments(args),
                        seed=seed_of(rnd), task=task)

    if method == "central":
        central = model()
        pooled = Split(torch.cat([s.train.images for s in sites]), torch.cat([s.train.labels for s in sites]))
        fit(central, pooled, lambda rnd: seed * 1000 + rnd)
        models = [central] * len(sites)
    else:
        models = []
        for i, s in enumerate(sites):
            models.append(model())
            fit(models[-1], s.train, lambda rnd, i=i: seed * 1000 + rnd * 10 + i)
    scores, labels = [], []
    for m, s in zip(models, sites, strict=True):
        r = evaluate(m, s.test, task=task)
        scores.append(r.scores)
        labels.append(r.labels)
    per_site = {str(i + 1): a for i, (p, y) in enumerate(zip(scores, labels, strict=True))
                if (a := auc_score(y, p)) is not None}  # site ids count from 1, as a federation's
    y, p = np.concatenate(labels), np.concatenate(scores)
    return {"status": "completed", "test_auc": auc_score(y, p), "test_accuracy": accuracy_score(y, p),
            "test_auc_site_mean": float(np.mean(list(per_site.values()))) if per_site else None,
            "test_site_auc": per_site, "test_examples": int(len(y))}


def run(method: str, args: argparse.Namespace, seed: int) -> dict:
    t0 = time.perf_counter()
    result = baseline(method, args, seed) if method in ("central", "local") else federated(method, args, seed)
    return {"method": method, "dataset": args.dataset, "path": str(args.path) if args.path else None, "scheme": args.scheme, "alpha": args.alpha, "seed": seed,
            "split_seed": split_seed(args, seed), "rounds": args.rounds, "model": args.model, "count": args.count,
            "wall_s": round(time.perf_counter() - t0, 1), **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="pneumoniamnist")
    p.add_argument("--path", type=Path, default=None,
                   help="the data file (data.path; with --dataset medmnist, any MedMNIST-format .npz)")
    p.add_argument("--scheme", default="dirichlet", choices=["iid", "dirichlet", "quantity", "feature"])
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=15, help="federated rounds (central/local: as much training)")
    schedule_args = p.add_mutually_exclusive_group()
    schedule_args.add_argument("--local-steps", type=int, default=None,
                               help=f"minibatch steps per round (default {DEFAULT_LOCAL_STEPS}, the spec's)")
    schedule_args.add_argument("--local-epochs", type=int, default=None,
                               help="passes over each site's data per round instead (sites allow it: allow_epochs)")
    p.add_argument("--count", default="one", choices=["one", "pow2", "exact"],
                   help="the sample count each site sends (policy.count; FedAvg's weights)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="selection.seed: initial model and local shuffling")
    p.add_argument("--split-seed", type=int, default=None,
                   help="data.partition.seed for every run (default: each run's own seed)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--model", default="small_cnn", choices=MODEL_NAMES)
    p.add_argument("--norm", default="batch", choices=["batch", "group"])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--groups", type=int, default=ModelConfig().groups, help="GroupNorm groups")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mu", type=float, default=0.01, help="FedProx's mu")
    p.add_argument("--server-lr", type=float, default=None,
                   help="the server optimiser's learning rate (default: fed.yaml's, 1, or 0.01 for the adaptive ones)")
    p.add_argument("--server-momentum", type=float, default=None, help="FedAvgM's server momentum (default 0.9)")
    p.add_argument("--no-secagg", dest="secagg", action="store_false", help="aggregate in the clear")
    p.add_argument("--dp-epsilon", type=float, default=None, help="federated methods train with DP-SGD at this epsilon")
    p.add_argument("--dp-delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0, help="DP-SGD per-sample clipping norm")
    p.add_argument("--aug-mult", type=int, default=1, help="DP: augmentation multiplicity K")
    p.add_argument("--threads", type=int, default=1, help="torch threads (per site)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        for method in args.methods:
            print(json.dumps(run(method, args, seed)), flush=True)


if __name__ == "__main__":
    main()
