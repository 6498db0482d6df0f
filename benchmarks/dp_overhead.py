"""Time per local training step with DP-SGD against plain SGD: same model, same batch, one run.

    python benchmarks/dp_overhead.py [--model small_cnn] [--width 32] [--batch 64] [--steps 30] [--json]
    python benchmarks/dp_overhead.py --model scatter_linear --json   # on ScatterNet features

Modes: ``plain`` (no DP), ``dp_hooks`` (Opacus' per-sample gradients through hooks, what the
sites run) and ``dp_ghost`` (Opacus' ghost clipping: per-sample gradient *norms* only, two
backward passes, far less memory).  Each is timed over ``--steps`` steps after 3 warm-up steps,
on a GroupNorm model (DP-compatible), with fixed-size batches from the bundled chest X-rays
(their fixed ScatterNet features for ``scatter_linear``, computed once before timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from opacus import PrivacyEngine
from torch import nn

from asagiri.data import load_site_data
from asagiri.models import MODEL_NAMES, build, prepare_data


def time_mode(mode: str, args: argparse.Namespace, data) -> float:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build(args.model, in_channels=1, num_classes=2, width=args.width, norm="group", groups=args.groups)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images, data.labels),
                                         batch_size=args.batch, shuffle=True, drop_last=True)
    criterion: nn.Module = nn.CrossEntropyLoss()
    if mode != "plain":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            kw = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                      poisson_sampling=False)
            if mode == "dp_ghost":
                model, opt, criterion, loader = engine.make_private(**kw, criterion=criterion, grad_sample_mode="ghost")
            else:
                model, opt, loader = engine.make_private(**kw)
    times = []
    batches = iter(loader)
    for i in range(args.steps + 3):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small_cnn", choices=MODEL_NAMES)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--groups", type=int, default=32, help="GroupNorm groups (the config's default)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = prepare_data(args.model, load_site_data(dataset="pneumoniamnist", path=None, site_index=0, num_sites=1,
                                                   scheme="iid", alpha=1, seed=0))
    result: dict = {"model": args.model, "width": args.width, "groups": args.groups, "batch": args.batch,
                    "threads": args.threads}
    for mode in ("plain", "dp_hooks", "dp_ghost"):
        result[f"{mode}_ms_per_step"] = round(1000 * time_mode(mode, args, data.train), 2)
    for mode in ("dp_hooks", "dp_ghost"):
        result[f"{mode}_ratio"] = round(result[f"{mode}_ms_per_step"] / result["plain_ms_per_step"], 2)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
