"""Recipes (``examples/NAME.yaml``): a federation's training settings under a name, and the
advice that points a DP configuration known to train badly at the one that does not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, FederationConfig

__all__ = ["DP_RECIPE", "Recipe", "dp_advice", "dp_pitfalls", "load_recipe"]


# Keys a recipe may not set: the demo lays out the roster, the keys, the address and the folder.
_DEMO_OWNED = ("sites", "identity_key", "listen", "run_dir", "run_id")


@dataclass(frozen=True)
class Recipe:
    """``examples/NAME.yaml``: a federation's training settings (any fed.yaml keys but the
    roster, keys, address and folder), its ``rounds`` apart (a command line may shorten them)
    and, under ``demo:``, how many sites the demo starts."""

    settings: dict[str, Any]
    sites: int | None
    rounds: int | None
    description: str


def load_recipe(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the recipe: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of fed.yaml settings")
    demo = data.pop("demo", None) or {}
    description = data.pop("description", "")
    if not isinstance(demo, dict) or set(demo) - {"sites"}:
        raise ConfigError(f"{path}: demo: only 'sites' may be set there")
    if owned := sorted(set(data) & set(_DEMO_OWNED)):
        raise ConfigError(f"{path}: {', '.join(owned)}: set by the demo, not by a recipe")
    sites = demo.get("sites")
    if sites is not None and (type(sites) is not int or sites < 1):
        raise ConfigError(f"{path}: demo.sites must be a whole number of at least 1")
    return Recipe(data, sites, data.pop("rounds", None), str(description))


DP_RECIPE = "examples/dp-chest-xray.yaml"


def dp_advice(cfg: FederationConfig) -> str | None:
    """A warning for a DP configuration with settings known to train badly under DP-SGD, naming
    the recipe that does not; None if there is nothing to say."""
    found = dp_pitfalls(cfg)
    if not found:
        return None
    return (f"DP-SGD with {'; '.join(found)} trains poorly; {DP_RECIPE} is the configuration that keeps the AUC "
            f"(docs/privacy.md): asagiri demo --config {DP_RECIPE}")


def dp_pitfalls(cfg: FederationConfig) -> list[str]:
    """What in a DP configuration is known to train badly under DP-SGD (docs/privacy.md)."""
    if not cfg.dp.enabled:
        return []
    found = []
    if cfg.model.name != "scatter_linear":
        found.append(f"model {cfg.model.name} (SmallCNN lost 8.8 AUC points at epsilon 8 where {DP_RECIPE}'s "
                     f"scatter_linear lost 3.1)")
        if cfg.model.norm == "batch":
            found.append("BatchNorm (converted to GroupNorm for per-example gradients)")
    if cfg.train.optimizer == "adam":
        found.append("Adam (the recipe uses SGD with momentum, lr 0.4)")
    if cfg.train.augment or cfg.dp.augmentation_multiplicity > 1:
        found.append("augmentation")
    return found
