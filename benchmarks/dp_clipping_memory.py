"""Peak memory of one DP-SGD epoch: per-example gradients (Opacus' hooks) against ghost clipping.

    python benchmarks/dp_clipping_memory.py                    # ResNet-18, 28 and 224 px, batch 64
    python benchmarks/dp_clipping_memory.py --sizes 64 --images 128 --json

Each mode runs in a fresh process (peak resident memory only grows), which builds the model and
random images, notes its peak, runs ``privacy.engine.train_dp`` for ``--epochs`` epochs and reports
how far the peak rose, and the seconds of the last epoch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings


def child(size: int, images: int, mode: str, epochs: int) -> dict:
    import torch

    from asagiri.data.loaders import Split
    from asagiri.models import build
    from asagiri.privacy.engine import train_dp
    from asagiri.train.accel import Accel

    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(0)
    data = Split(torch.rand(images, 1, size, size, generator=g) * 2 - 1, torch.randint(0, 2, (images,), generator=g))
    torch.manual_seed(0)
    model = build("resnet18", in_channels=1, num_classes=2, width=64, norm="group", groups=32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = 0.0
    for _ in range(epochs):
        t = time.perf_counter()
        train_dp(model, data, epochs=1, expected_batch=64, lr=0.01, optimizer="sgd", momentum=0.9,
                 noise_multiplier=1.0, max_grad_norm=1.0, augment=False, accel=Accel(ghost_clipping=mode == "ghost"))
        seconds = time.perf_counter() - t
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"model": "resnet18", "size": size, "images": images, "batch": 64, "clipping": mode,
            "peak_rise_mb": round(grown / 1024), "last_epoch_s": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[28, 224])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.images, args.child[1], args.epochs)))
        return 0
    for size in args.sizes:
        for mode in ("hooks", "ghost"):
            out = subprocess.run([sys.executable, __file__, "--child", str(size), mode, "--images", str(args.images),
                                  "--epochs", str(args.epochs)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.splitlines()[-1])
            print(json.dumps(row) if args.json else
                  f"{size:4d}px {mode:5s}: peak +{row['peak_rise_mb']} MB, last epoch {row['last_epoch_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
