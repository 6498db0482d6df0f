"""The speed settings (train/accel.py) change how a site trains, never what: each is compared
with plain float32 training, or with a per-example reference computed here by hand."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F

from asagiri.data.loaders import Split
from asagiri.models import build
from asagiri.privacy.engine import train_dp
from asagiri.train.accel import PLAIN, Accel
from asagiri.train.loop import evaluate, train_local

CPU = torch.device("cpu")


def toy(n: int = 24, size: int = 12, task: str = "binary", seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    if task == "multilabel":
        return Split(x, (torch.rand(n, 3, generator=g) > 0.5).float())
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long()  # learnable: brightness
    return Split(x, y)


def small_model(classes: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return build("small_cnn", in_channels=1, num_classes=classes, width=8, norm="group", groups=4)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def per_example_gradients(model: torch.nn.Module, data: Split, task: str) -> list[torch.Tensor]:
    out = []
    for i in range(len(data)):
        model.zero_grad()
        logits = model(data.images[i : i + 1])
        if task == "multilabel":
            loss = F.binary_cross_entropy_with_logits(logits, data.labels[i : i + 1])
        else:
            loss = F.cross_entropy(logits, data.labels[i : i + 1])
        loss.backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return out


def clipped_step_by_hand(model: torch.nn.Module, grads: list[torch.Tensor], *, clip: float, lr: float) -> torch.Tensor:
    """One DP-SGD step with no noise over the whole set, one example at a time: each example's
    gradient clipped to ``clip``, summed, divided by the expected batch (all of it)."""
    total = sum(g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in grads)
    return flat(model) - lr * total / len(grads)


@pytest.mark.parametrize("task", ["binary", "multilabel"])
@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "hooks"])
def test_dp_step_is_the_clipped_sum(task: str, ghost: bool) -> None:
    data = toy(task=task)
    start = small_model(3 if task == "multilabel" else 2)
    grads = per_example_gradients(copy.deepcopy(start), data, task)
    clip = float(torch.stack([g.norm() for g in grads]).median())  # half clipped, half not
    expected = clipped_step_by_hand(start, grads, clip=clip, lr=0.5)
    model = copy.deepcopy(start)
    # q = 1 and sigma = 0: one step over every example, no noise, so the result is exact.
    r = train_dp(model, data, epochs=1, expected_batch=len(data), lr=0.5, optimizer="sgd", momentum=0.0,
                 noise_multiplier=0.0, max_grad_norm=clip, augment=False, task=task,
                 accel=Accel(ghost_clipping=ghost))
    assert r.steps == 1
    moved = (expected - flat(start)).abs().max()
    assert moved > 1e-3  # the step did something, so agreeing with it means something
    assert torch.allclose(flat(model), expected, atol=1e-6, rtol=1e-4)


def test_ghost_and_hooks_train_a_round_alike() -> None:
    data, start = toy(40), small_model()
    out = []
    for accel in (Accel(ghost_clipping=True), PLAIN):
        model = copy.deepcopy(start)
        torch.manual_seed(1)  # the same Poisson batches and noise
        train_dp(model, data, epochs=2, expected_batch=10, lr=0.5, optimizer="sgd", momentum=0.9,
                 noise_multiplier=0.5, max_grad_norm=0.1, augment=True, accel=accel)
        out.append(flat(model))
    assert (out[0] - flat(start)).abs().max() > 1e-3
    assert torch.allclose(out[0], out[1], atol=1e-5)


def per_example_conv_grads(channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from opacus import GradSampleModule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4),
                              torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 2))
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 1, 0, 1])
    by_hand = []
    for i in range(5):
        net.zero_grad()
        F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        by_hand.append(net[2].weight.grad.clone())
    if channels_last:
        net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(net)
        F.cross_entropy(gsm(x), y).backward()
    return net[2].weight.grad_sample, torch.stack(by_hand)


def test_opacus_per_example_gradients_of_a_channels_last_convolution_are_wrong() -> None:
    """Why DP-SGD never runs channels-last.  If this fails, Opacus has fixed it and
    ``Accel.resolve`` may allow channels-last under DP again."""
    ours, by_hand = per_example_conv_grads(channels_last=False)
    assert torch.allclose(ours, by_hand, atol=1e-5)
    wrong, by_hand = per_example_conv_grads(channels_last=True)
    assert (wrong - by_hand).abs().max() > 1e-2


def test_dp_trains_in_float32_without_channels_last_or_compile(caplog: pytest.LogCaptureFixture) -> None:
    asked = dict(precision="bf16", channels_last="on", compile=True, dp_clipping="auto")
    private = Accel.resolve(**asked, device=torch.device("cuda"), private=True)
    assert (private.amp, private.channels_last, private.compile, private.ghost_clipping) == (None, False, False, True)
    assert caplog.text.count("not used under DP-SGD") == 3
    plain = Accel.resolve(**asked, device=CPU, private=False)
    assert (plain.amp, plain.channels_last, plain.compile, plain.ghost_clipping) == (torch.bfloat16, True, True, False)
    assert Accel.resolve(dp_clipping="hooks", device=torch.device("cuda"), private=True).ghost_clipping is False
    assert Accel.resolve(dp_clipping="auto", device=CPU, private=True).ghost_clipping is False
    assert Accel.resolve(dp_clipping="ghost", device=CPU, private=True).ghost_clipping is True


@pytest.mark.parametrize("unsafe", [Accel(amp=torch.bfloat16), Accel(channels_last=True), Accel(compile=True)])
def test_dp_training_refuses_settings_that_void_its_bound(unsafe: Accel) -> None:
    model = small_model()
    before = flat(model)
    with pytest.raises(ValueError, match="DP-SGD runs in float32"):
        train_dp(model, toy(), epochs=1, expected_batch=8, lr=0.1, optimizer="sgd", momentum=0.0,
                 noise_multiplier=1.0, max_grad_norm=1.0, accel=unsafe)
    assert torch.equal(flat(model), before)


def test_auto_leaves_a_cpu_as_it_was_and_speeds_up_a_gpu() -> None:
    assert Accel.resolve(device=CPU, private=False) == PLAIN
    gpu = Accel.resolve(device=torch.device("cuda"), private=False)
    # bfloat16 where the GPU supports it (this machine has no GPU: it says not, so float16)
    assert gpu.amp in (torch.bfloat16, torch.float16) and gpu.channels_last and not gpu.compile


def test_channels_last_trains_the_same() -> None:
    data, start = toy(), small_model()
    plain, nhwc = copy.deepcopy(start), copy.deepcopy(start)
    train_local(plain, data, epochs=2, batch_size=8, lr=0.3, optimizer="sgd", seed=3)
    train_local(nhwc, data, epochs=2, batch_size=8, lr=0.3, optimizer="sgd", seed=3, accel=Accel(channels_last=True))
    assert nhwc.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert (flat(plain) - flat(start)).abs().max() > 1e-2
    assert torch.allclose(flat(plain), flat(nhwc), atol=1e-5)
    assert list(plain.state_dict()) == list(nhwc.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_runs_the_forward_pass_in_it_and_learns(dtype: torch.dtype) -> None:
    data, model = toy(64, size=8), small_model()
    seen: list[torch.dtype] = []
    model.features[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    accel = Accel(amp=dtype)
    before = evaluate(model, data, accel=accel).loss
    result = train_local(model, data, epochs=8, batch_size=16, lr=0.3, optimizer="sgd", augment=False, accel=accel)
    after = evaluate(model, data, accel=accel)
    assert set(seen) == {dtype}
    assert result.steps == 32 and after.loss < before and after.scores.dtype.name == "float32"
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_compiled_forward_is_built_once_and_trains_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    compile_eager = functools.partial(torch.compile, backend="eager")  # inductor takes a minute on CPU

    def counting(model: torch.nn.Module) -> torch.nn.Module:
        calls.append(model)
        return compile_eager(model)

    monkeypatch.setattr(torch, "compile", counting)
    data, start = toy(), small_model()
    plain, compiled = copy.deepcopy(start), copy.deepcopy(start)
    accel = Accel(compile=True)
    for rnd in range(2):
        train_local(plain, data, epochs=1, batch_size=8, lr=0.3, optimizer="sgd", seed=rnd)
        train_local(compiled, data, epochs=1, batch_size=8, lr=0.3, optimizer="sgd", seed=rnd, accel=accel)
    assert calls == [compiled]
    assert (flat(plain) - flat(start)).abs().max() > 1e-2
    assert torch.allclose(flat(plain), flat(compiled), atol=1e-5)
    assert list(compiled.state_dict()) == list(start.state_dict())


def site_worker(tmp_path, *, accel: dict, dp: dict | None = None, augment: bool = False):
    from asagiri.config import FederationConfig, RunSpec, SiteConfig
    from asagiri.site.worker import SiteWorker
    from asagiri.wire.crypto import Identity
    from asagiri.wire.messages import Welcome

    key = Identity.generate()
    tmp_path.mkdir(parents=True, exist_ok=True)
    key.save(tmp_path / "k.key")
    cfg = SiteConfig(site_id=1, identity_key=tmp_path / "k.key", state_dir=tmp_path / "state", device="cpu",
                     coordinator={"public_key": key.public.hex()}, peers={1: key.public.hex()}, accel=accel)
    fed = FederationConfig.model_validate({
        "model": {"name": "small_cnn", "norm": "group", "width": 8, "groups": 4},
        "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1, "optimizer": "sgd", "augment": augment},
        "data": {"dataset": "synthetic", "synthetic_samples": 64, "image_size": 28,
                 "partition": {"scheme": "iid", "alpha": 1.0, "seed": 0}},
        "dp": dp or {"enabled": False},
    })
    spec = RunSpec.of(fed)
    return SiteWorker(cfg, Welcome("r", 0, 1, spec.wire()), spec)


def test_a_site_trains_with_its_accel_settings(tmp_path, caplog):
    import numpy as np

    from asagiri.config import PolicyConfig
    from asagiri.policy import SitePolicy
    from asagiri.wire.messages import FitIns

    caplog.set_level("INFO")
    plain = site_worker(tmp_path / "plain", accel={"precision": "bf16", "channels_last": "on"})
    assert plain.accel == Accel(amp=torch.bfloat16, channels_last=True)
    assert "training on cpu: bfloat16 autocast, channels-last" in caplog.text
    assert plain.data.train.images.dtype == torch.uint8  # the share is held compact, scaled per batch
    params = {k: v.detach().numpy().copy() for k, v in plain.model.state_dict().items() if k in plain.shared}
    res = plain.fit(FitIns(1, 1, params, {"seed": 1}), SitePolicy(PolicyConfig(count="exact")))
    assert all(np.isfinite(v).all() for v in res.update.values()) and any(np.abs(v).max() > 0 for v in res.update.values())

    dp = {"enabled": True, "noise_multiplier": 1.0, "augmentation_multiplicity": 2}
    averaged = site_worker(tmp_path / "k2", accel={"dp_clipping": "ghost", "precision": "bf16"}, dp=dp, augment=True)
    assert averaged.accel == PLAIN  # float32, and hooks: the K copies' gradients are averaged per example
    assert "clipping with Opacus' hooks instead" in caplog.text
    ghost = site_worker(tmp_path / "k1", accel={"dp_clipping": "ghost"}, dp={**dp, "augmentation_multiplicity": 1})
    assert ghost.accel == Accel(ghost_clipping=True)
