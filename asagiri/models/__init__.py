"""Models built by name from ``ModelConfig`` (our own code; torchvision is not used)."""

from .registry import (
           MODEL_NAMES,
           build,
           dp_norm,
           is_norm_key,
           prepare_data,
           prepare_split,
           shared_keys,
           trains_on_features,
)

__all__ = ["MODEL_NAMES", "build", "dp_norm", "is_norm_key", "prepare_data", "prepare_split", "shared_keys",
           "trains_on_features"]
