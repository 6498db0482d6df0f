"""DP-SGD on a GPU: the site's training path on ``cuda`` against the same path on the CPU.

    python benchmarks/dp_gpu_check.py --json                 # needs a CUDA device
    python benchmarks/dp_gpu_check.py --images 512 --json    # fewer images per timed round

For the SmallCNN and the ResNet-18 (both built with BatchNorm, converted for DP by
``dp_compatible``, the ResNet being the known in-place-activation trap), on the bundled chest
X-rays (site 0 of the Dirichlet 0.3 split, first ``--images`` images):

- one round of ``train_dp`` on the GPU and one on the CPU, same data, sigma and clipping, with the
  seconds per step of each (the first GPU round, which pays CUDA's start-up, is a warm-up);
- checks that the model stayed on the GPU, moved, and holds no NaN; the same with augmentation
  multiplicity 4;
- the privacy ledger's epsilon for those rounds against Opacus' own accountant.

Prints one JSON object; exits 1 if a check fails, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from opacus.accountants import RDPAccountant

from asagiri.data import load_site_data
from asagiri.data.loaders import Split
from asagiri.models import build
from asagiri.privacy.engine import dp_compatible, noise_for_target, steps_per_round, train_dp
from asagiri.privacy.ledger import PrivacyLedger


def one_round(model: torch.nn.Module, data: Split, device: str, sigma: float, multiplicity: int = 1) -> dict:
    model.to(device)
    before = [p.detach().clone() for p in model.parameters()]
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = train_dp(model, data, epochs=1, expected_batch=64, lr=1e-3, optimizer="adam", momentum=0.9,
                 noise_multiplier=sigma, max_grad_norm=1.0, multiplicity=multiplicity, seed=0, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    params = list(model.parameters())
    return {
        "device": device,
        "multiplicity": multiplicity,
        "steps": r.steps,
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / max(r.steps, 1), 5),
        "loss": round(r.loss, 4),
        "on_device": all(p.device.type == device for p in params),
        "moved": any(not torch.equal(p.detach().cpu(), b.cpu()) for p, b in zip(params, before, strict=True)),
        "finite": all(bool(torch.isfinite(p).all()) for p in params),
        "sample_rate": r.sample_rate,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs one", file=sys.stderr)
        return 2
    site = load_site_data(dataset="pneumoniamnist", path=None, site_index=0, num_sites=4, scheme="dirichlet",
                          alpha=0.3, seed=0)
    data = Split(site.train.images[: args.images], site.train.labels[: args.images])
    q, steps = steps_per_round(len(data), 64, 1)
    sigma = noise_for_target(target_epsilon=8.0, delta=1e-5, sample_rate=q, steps=steps * 15)
    out: dict = {
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "images": len(data), "sigma": sigma,
        "models": {},
    }
    ok = True
    history = []
    for name, width in (("small_cnn", 32), ("resnet18", 16)):
        torch.manual_seed(0)
        model, changed = dp_compatible(build(name, in_channels=1, num_classes=2, width=width, norm="batch", groups=8))
        warm = copy.deepcopy(model)
        one_round(warm, data, "cuda", sigma)  # CUDA context, kernels and Opacus hooks: not timed
        gpu = one_round(copy.deepcopy(model), data, "cuda", sigma)
        cpu = one_round(copy.deepcopy(model), data, "cpu", sigma)
        mult = one_round(copy.deepcopy(model), data, "cuda", sigma, multiplicity=4)
        runs = (gpu, cpu, mult)
        out["models"][name] = {
            "converted_batchnorm": changed,
            "params": sum(p.numel() for p in model.parameters()),
            "gpu": gpu, "cpu": cpu, "gpu_multiplicity_4": mult,
            "cpu_over_gpu_seconds_per_step": round(cpu["seconds_per_step"] / gpu["seconds_per_step"], 2),
        }
        ok &= changed and all(r["on_device"] and r["moved"] and r["finite"] for r in runs)
        history += [(sigma, r["sample_rate"], r["steps"]) for r in runs]
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger(Path(tmp) / "ledger.json", delta=1e-5)
        reference = RDPAccountant()
        for rnd, (s, rate, n) in enumerate(history, start=1):
            eps = ledger.record(rnd, noise_multiplier=s, sample_rate=rate, steps=n)
            reference.history.append((s, rate, n))
        expected = reference.get_epsilon(delta=1e-5)
        out["ledger_epsilon"] = round(eps, 6)
        out["opacus_epsilon"] = round(expected, 6)
        ok &= abs(eps - expected) < 1e-9
    out["ok"] = bool(ok)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
