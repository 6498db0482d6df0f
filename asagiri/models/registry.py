"""A small CNN for 28-64 px images, a ResNet-18-style network for 128-224 px, and a linear model on
ScatterNet features (``scatter.py``) for DP-SGD."""

from __future__ import annotations

from typing import get_args

from torch import nn

from ..config import ModelName
from ..splits import SiteData, Split

__all__ = ["MODEL_NAMES", "ResNet18", "SmallCNN", "build", "dp_norm", "is_norm_key", "prepare_data",
           "prepare_split", "shared_keys", "trains_on_features"]

MODEL_NAMES: tuple[str, ...] = get_args(ModelName)

# Opacus' ModuleValidator.fix, which the sites apply for DP-SGD, makes each BatchNorm a
# GroupNorm(min(32, C), C); tests/privacy/test_dp.py checks dp_norm builds the same model.
_OPACUS_GROUPS = 32


def dp_norm(name: str, norm: str, groups: int) -> tuple[str, int]:
    """The (norm, groups) model ``name``, configured with ``norm``/``groups``, has once made
    DP-compatible.  ``scatter_linear`` has GroupNorm whatever ``norm`` says."""
    if norm == "batch" and name != "scatter_linear":
        return "group", _OPACUS_GROUPS
    return norm, groups

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class SmallCNN(nn.Module):
    """Three conv-norm-ReLU blocks (w, 2w, 4w channels), global average pooling, a linear head."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, norm: str = "batch", groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm(norm, c_out, groups), nn.ReLU()]
            layers.append(nn.MaxPool2d(2) if i < 2 else nn.AdaptiveAvgPool2d(1))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.features(x).flatten(1))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, c_out, groups)
        self.relu = nn.ReLU()  # not in-place: Opacus' grad samplers need the activations intact
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(norm, c_out, groups))
            if stride != 1 or c_in != c_out
            else nn.Sequential()
        )

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 layout (2-2-2-2 basic blocks), widths w, 2w, 4w, 8w (64 gives the classic 11 M)."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 64, norm: str = "batch", groups: int = 32):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), _norm(norm, width, groups), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        c_in = width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            blocks += [_Block(c_in, c_out, stride, norm, groups), _Block(c_out, c_out, 1, norm, groups)]
            c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.pool(self.layers(self.stem(x))).flatten(1))


def build(name: str, *, in_channels: int, num_classes: int, width: int, norm: str, groups: int) -> nn.Module:
    if name == "small_cnn":
        return SmallCNN(in_channels, num_classes, width=width, norm=norm, groups=groups)
    if name == "resnet18":
        return ResNet18(in_channels, num_classes, width=width, norm=norm, groups=groups)
    if name == "scatter_linear":  # width and norm do not apply: fixed features, then GroupNorm and a linear layer
        from .scatter import ScatterLinear

        return ScatterLinear(in_channels, num_classes, groups=groups)
    raise ValueError(f"unknown model {name!r}")


def trains_on_features(name: str) -> bool:
    """Whether the model takes fixed features of the images (computed once per site), not the images."""
    return name == "scatter_linear"


def prepare_data(name: str, data: SiteData) -> SiteData:
    """What the model trains and evaluates on: the images, or their fixed features."""
    if not trains_on_features(name):
        return data
    from .scatter import featurise

    return featurise(data)


def prepare_split(name: str, split: Split) -> Split:
    """One split as the model takes it (``prepare_data`` for a split on its own)."""
    if not trains_on_features(name):
        return split
    from .scatter import featurise_split

    return featurise_split(split)


def _norm_prefixes(model: nn.Module) -> list[str]:
    return [name + "." for name, m in model.named_modules() if isinstance(m, _NORM_TYPES)]


def is_norm_key(model: nn.Module, key: str) -> bool:
    return any(key.startswith(p) for p in _norm_prefixes(model))


def shared_keys(model: nn.Module, *, fedbn: bool) -> list[str]:
    """State-dict entries that leave the site: floating-point tensors, minus norm layers under FedBN.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are bookkeeping and stay local.
    """
    prefixes = _norm_prefixes(model)
    keys = []
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        if fedbn and any(key.startswith(p) for p in prefixes):
            continue
        keys.append(key)
    return keys
