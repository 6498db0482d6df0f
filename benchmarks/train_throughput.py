"""Training throughput: the site's training path against a bare PyTorch loop, side by side.

    python benchmarks/train_throughput.py                         # CPU defaults (docs/benchmarks.md)
    python benchmarks/train_throughput.py --device cuda --images 2048        # what a GPU site runs
    python benchmarks/train_throughput.py --device cuda --precision fp32 --channels-last off  # eager float32
    python benchmarks/train_throughput.py --models small_cnn --sizes 28 --images 128 --json   # CI's form

For each model (``small_cnn``, ``resnet18``, ``scatter_linear``) and image size, with and without
DP, on the same data tensors (random images and labels of that size) and the same batch size:

- ``ours``: the site's path, ``train.loop.train_local`` (or ``privacy.engine.train_dp`` for DP),
  augmentation off;
- ``bare``: the loop a person would write: shuffle, forward, cross-entropy, backward, step (for DP,
  Opacus' ``PrivacyEngine.make_private`` with Poisson sampling, the same noise and clipping).

Both sides use the same speed settings, resolved as a site resolves its ``accel`` settings for the
device (``train/accel.py``: on CUDA, by default, bfloat16 autocast, channels-last and pinned
non-blocking copies; ghost clipping for DP), so the ratio is what our path costs, not what a
setting saves.  Each row names them.

Each is timed over ``--repeat`` rounds of one epoch after a warm-up round, alternating, from the
same initial weights; images per second is the best round's.  ``ratio`` is ours / bare (the goal
is at least 0.9).  ``scatter_linear`` trains on its fixed features: both sides get the features
(computed once, outside the timing), as a site does.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings

import torch

from asagiri.data.loaders import Split
from asagiri.models import build
from asagiri.models.registry import prepare_split, trains_on_features
from asagiri.train.accel import Accel
from asagiri.train.loop import evaluate, train_local

LR, MOMENTUM, CLIP, SIGMA = 0.01, 0.9, 1.0, 1.0


def data_for(name: str, size: int, images: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    split = Split(torch.rand(images, 1, size, size, generator=g) * 2 - 1, torch.randint(0, 2, (images,), generator=g))
    return prepare_split(name, split) if trains_on_features(name) else split


def model_for(name: str, dp: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build(name, in_channels=1, num_classes=2, width=32 if name == "small_cnn" else 64,
                  norm="group" if dp else "batch", groups=32)
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours(model, data: Split, batch: int, dp: bool, device: str, accel: Accel) -> None:
    if dp:
        from asagiri.privacy.engine import train_dp

        train_dp(model, data, epochs=1, expected_batch=batch, lr=LR, optimizer="sgd", momentum=MOMENTUM,
                 noise_multiplier=SIGMA, max_grad_norm=CLIP, augment=False, device=device, accel=accel)
    else:
        train_local(model, data, epochs=1, batch_size=batch, lr=LR, optimizer="sgd", momentum=MOMENTUM,
                    augment=False, device=device, accel=accel)


def bare(model, data: Split, batch: int, dp: bool, device: str, accel: Accel) -> None:
    if accel.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x_all, y_all = data.images, data.labels
    loss_of = torch.nn.CrossEntropyLoss()
    if dp:
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(x_all, y_all), batch_size=batch, pin_memory=device == "cuda")
        out = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                                           max_grad_norm=CLIP, criterion=loss_of,
                                           grad_sample_mode="ghost" if accel.ghost_clipping else "hooks")
        model, opt, loss_of, loader = out if accel.ghost_clipping else (out[0], out[1], loss_of, out[2])
        batches = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)
    else:
        order = torch.randperm(len(y_all))
        pin = (lambda t: t.pin_memory()) if device == "cuda" else (lambda t: t)
        batches = ((pin(x_all[order[i : i + batch]]).to(device, non_blocking=True),
                    pin(y_all[order[i : i + batch]]).to(device, non_blocking=True))
                   for i in range(0, len(y_all), batch))
    forward = accel.forward_of(model)  # compiled once per model (in the warm-up), as a site's is
    model.train()
    for x, y in batches:
        if len(y) == 0:
            continue
        if accel.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with accel.autocast(torch.device(device)):
            logits = forward(x)
        loss_of(logits.float(), y).backward()
        opt.step()
    if dp:
        model._close()  # Opacus' hooks off the model, which the next round reuses (as ours does)


def measure(name: str, size: int, dp: bool, *, images: int, batch: int, repeat: int, device: str,
            accel: Accel) -> dict:
    data = data_for(name, size, images)
    start = model_for(name, dp).to(device)
    best = {"ours": 0.0, "bare": 0.0}
    # One model per side, reset to the start's weights each round: a compiled model is compiled
    # once (in the warm-up), as a site's is.
    models = {"ours": copy.deepcopy(start), "bare": copy.deepcopy(start)}
    for rnd in range(repeat + 1):
        for side, fn in (("ours", ours), ("bare", bare)):
            model = models[side]
            model.load_state_dict(start.state_dict())
            sync(device)
            t = time.perf_counter()
            fn(model, data, batch, dp, device, accel)
            sync(device)
            if rnd > 0:  # round 0 warms both up
                best[side] = max(best[side], len(data) / (time.perf_counter() - t))
    row = {"model": name, "size": size, "dp": dp, "device": device, "accel": accel.describe(), "images": images,
           "batch": batch, "ours_images_s": round(best["ours"], 1), "bare_images_s": round(best["bare"], 1),
           "ratio": round(best["ours"] / best["bare"], 3)}
    if not dp:  # scoring a split, the other half of a round's work (the same with or without DP)
        model, scored = models["ours"], 0.0
        for _ in range(repeat):
            sync(device)
            t = time.perf_counter()
            evaluate(model, data, batch_size=4 * batch, device=device, accel=accel)
            sync(device)
            scored = max(scored, len(data) / (time.perf_counter() - t))
        row["eval_images_s"] = round(scored, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small_cnn", "resnet18", "scatter_linear"])
    p.add_argument("--sizes", nargs="+", type=int, default=[28, 64, 224])
    p.add_argument("--images", type=int, default=256, help="images per timed epoch (fewer at 224 px on CPU)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3,
                   help="timed rounds per side; the best counts (this VM's page faults make some rounds 2x slower)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile both sides (training without DP)")
    p.add_argument("--dp-clipping", choices=["auto", "ghost", "hooks"], default="auto")
    p.add_argument("--dp", choices=["both", "off", "on"], default="both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="one JSON object per line, nothing else")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG and hook notices, once per model
    torch.set_num_threads(torch.get_num_threads())
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.dp]
    rows = []
    for name in args.models:
        for size in args.sizes:
            if name == "scatter_linear" and size > 64:
                continue  # its features cost 64x more at 224 px than at 28 (docs/privacy.md): not its use
            images = args.images if size < 224 or args.device == "cuda" else max(args.batch, args.images // 8)
            for dp in modes:
                accel = Accel.resolve(precision=args.precision, channels_last=args.channels_last,
                                      compile=args.compile, dp_clipping=args.dp_clipping,
                                      device=torch.device(args.device), private=dp)
                row = measure(name, size, dp, images=images, batch=args.batch, repeat=args.repeat,
                              device=args.device, accel=accel)
                rows.append(row)
                print(json.dumps(row) if args.json else
                      f"{name:15s} {size:4d}px dp={str(dp):5s} ours {row['ours_images_s']:8.1f} img/s  "
                      f"bare {row['bare_images_s']:8.1f} img/s  ratio {row['ratio']:.3f}  ({row['accel']})",
                      flush=True)
    return 0 if all(r["ratio"] >= 0.9 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
